"""The report's charts (matplotlib, Agg): throughput, memory, accuracy, loss curves, log-prob drift."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medqa_core.compare.inputs import BASE, FINE_TUNED, PhaseScores, RunSummary
from medqa_core.compare.metrics import MEMORY, METRICS, SPEED, format_value
from medqa_core.compare.parity import PairParity, Tolerances

CHART_NAMES = ("throughput", "memory", "accuracy", "loss", "logprob_drift")
# Overlaid loss curves: each run its own line style and marker, so equal curves stay visible.
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P")
_BACKEND_COLORS = {"cuda": "#4c9a2a", "rocm": "#c0392b", "cpu": "#7f8c8d"}


def _new_figure(rows: int, cols: int = 1, width: float = 9.0, row_height: float = 2.6,
                height: float | None = None) -> Figure:
    # A Figure with its own Agg canvas: no pyplot, no global backend switch.
    fig = Figure(figsize=(width, height or max(2.2, row_height * rows)), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _bar_panels(runs: Sequence[RunSummary], keys: Sequence[str]) -> tuple[Figure, list[Axes]]:
    """One horizontal-bar panel per metric, each as tall as the runs that have that metric."""
    bars = [sum(k in r.metrics for r in runs) for k in keys]
    fig = _new_figure(len(keys), height=sum(0.5 * n + 1.2 for n in bars))
    axes = fig.subplots(len(keys), 1, squeeze=False, gridspec_kw={"height_ratios": [n + 2.4 for n in bars]})
    return fig, list(axes[:, 0])


def _color(run: RunSummary) -> str:
    return _BACKEND_COLORS.get(run.backend, "#2c3e50")


def _barh(ax: Axes, runs: Sequence[RunSummary], metric: str, title: str, unit: str, baseline: RunSummary) -> None:
    invalid = [r.rid for r in runs if metric in r.metrics and not math.isfinite(r.metrics[metric].value)]
    if invalid:  # no bar for a figure that is not finite: the table shows it as invalid
        title += f" ({', '.join(invalid)}: invalid, not drawn)"
    have = [r for r in runs if metric in r.metrics and math.isfinite(r.metrics[metric].value)]
    if not have:
        ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
        ax.text(0.5, 0.5, "no finite figure", transform=ax.transAxes, ha="center", va="center")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    values = np.array([r.metrics[metric].value for r in have])
    low = np.array([np.nan if r.metrics[metric].low is None else r.metrics[metric].low for r in have])
    high = np.array([np.nan if r.metrics[metric].high is None else r.metrics[metric].high for r in have])
    err = np.vstack([np.clip(values - low, 0, None), np.clip(high - values, 0, None)])  # NaN: no bar
    y = np.arange(len(have))
    ax.barh(y, values, color=[_color(r) for r in have], hatch=[("//" if r is baseline else "") for r in have],
            edgecolor="white")
    banded = np.isfinite(err).all(axis=0)  # [R]; runs without a measured band get no error bar
    if banded.any():
        # xerr as lists: matplotlib's finiteness probe warns on one-element numpy rows.
        ax.errorbar(values[banded], y[banded], xerr=err[:, banded].tolist(), fmt="none", ecolor="black", capsize=4)
        title += " (error bars: interquartile range)"
    ax.set_yticks(y, [r.label + (" [baseline]" if r is baseline else "") for r in have])
    ax.invert_yaxis()
    ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
    ax.set_xlabel(unit)
    for yi, v, hi in zip(y, values, high, strict=True):  # the label goes past the error bar
        ax.annotate(format_value(v, unit), (np.nanmax([v, hi]), yi),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlim(0, 1.3 * np.nanmax(np.concatenate([values, high])))  # room for the labels


def _throughput_chart(runs: Sequence[RunSummary], baseline: RunSummary) -> Figure | None:
    """Train, prefill, decode and scoring rates per run, with IQR error bars where measured."""
    shown = [(m.key, m.label, m.unit) for m in METRICS if m.kind == SPEED and any(m.key in r.metrics for r in runs)]
    if not shown:
        return None
    fig, axes = _bar_panels(runs, [k for k, _, _ in shown])
    for ax, (key, label, unit) in zip(axes, shown, strict=True):
        _barh(ax, runs, key, label, unit, baseline)
    return fig


def _memory_chart(runs: Sequence[RunSummary], baseline: RunSummary) -> Figure | None:
    """Peak device memory and host RSS per run."""
    shown = [(m.key, m.label) for m in METRICS if m.kind == MEMORY and any(m.key in r.metrics for r in runs)]
    if not shown:
        return None
    fig, axes = _bar_panels(runs, [k for k, _ in shown])
    for ax, (key, label) in zip(axes, shown, strict=True):
        _barh(ax, runs, key, label, "GiB", baseline)
    return fig


def _accuracy_chart(runs: Sequence[RunSummary], baseline: RunSummary, tol: Tolerances) -> Figure | None:
    """Accuracy with Wilson 95% CIs per phase; the band is the baseline's accuracy +- the margin."""
    phases = [p for p in (BASE, FINE_TUNED) if any(p in r.phases for r in runs)]
    if not phases:
        return None
    counts = [sum(p in r.phases for r in runs) for p in phases]
    fig = _new_figure(len(phases), height=sum(0.5 * n + 1.5 for n in counts) + 0.3)
    axes = fig.subplots(len(phases), 1, squeeze=False, gridspec_kw={"height_ratios": [n + 3 for n in counts]})
    for ax, phase in zip(axes[:, 0], phases, strict=True):
        _accuracy_panel(ax, [r for r in runs if phase in r.phases], phase, baseline.phases.get(phase), tol)
    handles = {label: h for ax in axes[:, 0] for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _accuracy_panel(ax: Axes, have: Sequence[RunSummary], phase: str, base: PhaseScores | None,
                    tol: Tolerances) -> None:
    if base is not None and math.isfinite(base.ci95[0]):
        ax.axvspan(100 * base.accuracy - tol.margin_pp, 100 * base.accuracy + tol.margin_pp, color="#3498db",
                   alpha=0.12, label=f"baseline +- {tol.margin_pp:g} pp")
    ax.axvline(25, color="#999", ls=":", lw=1, label="chance (4 options)")
    for yi, r in enumerate(have):
        s = r.phases[phase]
        a, (lo, hi) = 100 * s.accuracy, (100 * x for x in s.ci95)
        if not math.isfinite(lo):  # not a fraction of the questions scored: the table shows it as invalid
            ax.annotate(f"invalid ({s.accuracy})", (0, yi), xycoords=("axes fraction", "data"), xytext=(5, 0),
                        textcoords="offset points", va="center", fontsize=8, color="#c0392b")
            continue
        ax.errorbar(a, yi, xerr=[[a - lo], [hi - a]], fmt="o", color=_color(r), capsize=4)
        ax.annotate(f"{a:.1f}%  (n={s.n_questions})", (hi, yi), xytext=(5, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(range(len(have)), [r.label for r in have])
    ax.set_ylim(len(have) - 0.5, -0.5)
    ax.set_title(f"{phase} accuracy, 95% CI (Wilson)", loc="left", fontsize=10, fontweight="bold")
    ax.set_xlabel("accuracy (%)")
    ax.margins(x=0.25)


def _loss_chart(runs: Sequence[RunSummary]) -> Figure | None:
    """Training loss per step of every run that trained, overlaid."""
    have = [r for r in runs if r.loss_per_step]
    if not have:
        return None
    fig = _new_figure(1, row_height=3.6)
    ax = fig.subplots()
    for i, r in enumerate(have):
        steps = np.arange(1, len(r.loss_per_step) + 1)
        # Curves that agree lie on each other: styles, markers every few steps and transparency keep each visible.
        ax.plot(steps, r.loss_per_step, ls=_LINESTYLES[i % len(_LINESTYLES)], marker=_MARKERS[i % len(_MARKERS)],
                markevery=max(1, len(steps) // 12) + i, ms=5, alpha=0.75, lw=1.6, label=r.label,
                color=_color(r) if len({x.backend for x in have}) == len(have) else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("loss curves", loc="left", fontsize=10, fontweight="bold")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _logprob_chart(pairs: Sequence[PairParity]) -> Figure | None:
    """Histogram of every option's log-probability difference (run minus its reference), per pair and phase."""
    cells = [(p, ph) for p in pairs for ph in p.phases]
    if not cells:
        return None
    cols = 2 if len(cells) > 1 else 1
    rows = math.ceil(len(cells) / cols)
    fig = _new_figure(rows, cols, width=11 if cols == 2 else 8, row_height=3.0)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (p, ph) in zip(axes, cells, strict=False):
        d = np.asarray(ph.logprobs.differences)
        if not d.size or np.ptp(d) == 0:
            # Nothing to histogram: say what the panel would show instead of drawing an empty axis.
            text = (f"no finite log-probabilities to compare ({ph.logprobs.nonfinite} questions non-finite)"
                    if not d.size else f"identical: all {d.size} option log-probabilities\ndiffer by exactly {d[0]:g}"
                    " nats")
            ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.hist(d, bins=60, color="#8e44ad", alpha=0.8)
            ax.axvline(0, color="#2c3e50", lw=0.8, ls="--")
            ax.set_yscale("log")
        weights = "same weights" if ph.same_weights else "separately fine-tuned"
        ax.set_title(f"{p.b} vs {p.a}, {ph.phase} ({weights})\nmean |diff| {ph.logprobs.mean_abs:.3g} nats, "
                     f"mean KL {ph.logprobs.kl_mean:.1e} nats", loc="left", fontsize=9)
        if d.size and np.ptp(d) > 0:
            ax.set_xlabel("log-probability difference (nats)")
            ax.set_ylabel("options")
    for ax in axes[len(cells):]:
        ax.set_visible(False)
    return fig


def draw_charts(runs: Sequence[RunSummary], baseline: RunSummary, pairs: Sequence[PairParity], tol: Tolerances,
                out_dir: Path) -> dict[str, Path]:
    """Draw every chart that has data and save it as PNG.

    Args:
        runs: all runs.
        baseline: the run the others are compared with.
        pairs: the compared pairs (log-probability drift).
        tol: the parity tolerances (the accuracy chart's margin band).
        out_dir: folder for the PNG files.

    Returns:
        Chart name (CHART_NAMES) -> PNG path, for the charts drawn.
    """
    figures = {
        "throughput": _throughput_chart(runs, baseline),
        "memory": _memory_chart(runs, baseline),
        "accuracy": _accuracy_chart(runs, baseline, tol),
        "loss": _loss_chart(runs),
        "logprob_drift": _logprob_chart(pairs),
    }
    out: dict[str, Path] = {}
    for name, fig in figures.items():
        if fig is None:
            continue
        out[name] = out_dir / f"{name}.png"
        fig.savefig(out[name], dpi=110)
    return out
