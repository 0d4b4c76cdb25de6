"""The report's run-set section: each set's spread, the device effect against the seed spread, the loss bands.

Pure functions of run-set summaries (:mod:`medqa_core.compare.runsets`) and one chart (matplotlib, Agg); no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medqa_core.compare.runsets import (
    DEFAULT_ALPHA,
    DEFAULT_LOSS_MARGIN_NATS,
    DeviceEffect,
    SetComparison,
    SetSummary,
    compare_sets,
    machine_label,
    summarize_loaded,
)
from medqa_core.compare.stats import format_p
from medqa_core.results.runset import load_runset

CHART = "runset_loss"
_COLORS = ("#2c3e50", "#c0392b", "#4c9a2a", "#8e44ad", "#d35400")


@dataclass(frozen=True)
class RunSets:
    """The run sets given to a report: their summaries (the first is the baseline) and each other set compared
    with it."""

    summaries: tuple[SetSummary, ...]
    paths: tuple[str, ...]
    comparisons: tuple[SetComparison, ...]


def load_runsets(paths: Sequence[str | Path], margin_pp: float,
                 loss_margin_nats: float = DEFAULT_LOSS_MARGIN_NATS, alpha: float = DEFAULT_ALPHA,
                 target_nats: float | None = None) -> RunSets:
    """Read run-set files, summarize each, compare every set with the first.

    Args:
        paths: run-set files, the baseline's first.
        margin_pp: accuracy equivalence margin (points).
        loss_margin_nats: eval-loss equivalence margin (nats).
        alpha: the tests' level.
        target_nats: eval-loss target of time to target (None: each set's own).

    Raises:
        RunSetError: a file or a record it names cannot be read.
    """
    summaries = []
    for i, p in enumerate(paths):
        runset, loaded = load_runset(p)
        label = f"S{i + 1} {machine_label(runset.fingerprint)}"
        summaries.append(summarize_loaded(loaded, runset.target_loss_nats if target_nats is None else target_nats,
                                          label))
    comparisons = tuple(compare_sets(summaries[0], s, margin_pp, loss_margin_nats, alpha) for s in summaries[1:])
    return RunSets(tuple(summaries), tuple(str(p) for p in paths), comparisons)


def _fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}g}"


def spread_table(sets: RunSets) -> pd.DataFrame:
    """One row per set: seeds, accuracy and eval loss (mean, sd, range), the same-seed repeat, time to target."""
    rows = []
    for s, path in zip(sets.summaries, sets.paths, strict=True):
        acc, loss, rep, ttt = s.accuracy, s.eval_loss_nats, s.repeat, s.time_to_target
        repeat = "-" if rep is None else ("identical" if rep.identical else
                                          f"{rep.accuracy_pp:+.2f} pp, {rep.eval_loss_nats:+.3g} nats")
        rows.append({
            "set": s.label, "file": Path(path).name, "seeds": acc.n,
            "accuracy mean": f"{100 * acc.mean:.2f}%", "accuracy sd": f"{_fmt(100 * acc.sd)} pp",
            "accuracy range": f"{100 * acc.min:.2f}-{100 * acc.max:.2f}%",
            "eval loss mean": f"{loss.mean:.4f}", "eval loss sd": _fmt(loss.sd),
            "eval loss range": f"{loss.min:.4f}-{loss.max:.4f}",
            "same seed twice": repeat,
            f"time to {ttt.target_nats:g} nats": (f"{ttt.result_s:.1f} s (sd {_fmt(ttt.spread.sd)} s, "
                                                  f"{ttt.reached}/{len(ttt.steps)} reached)"
                                                  if ttt.result_s is not None else f"- ({ttt.why})"),
        })
    return pd.DataFrame(rows)


def effect_rows(effect: DeviceEffect, vs: str, against: str) -> dict[str, str]:
    c = effect.components
    return {
        "sets": f"{against} vs {vs}", "metric": f"{effect.metric} ({effect.unit})",
        "device effect": f"{effect.diff:+.3g}", "90% CI": f"[{effect.ci[0]:+.3g}, {effect.ci[1]:+.3g}]",
        "margin": f"+-{effect.margin:g}", "TOST p": format_p(effect.tost_p, bare=True),
        "permutation p": format_p(effect.permutation_p, bare=True),
        "sd same seed": _fmt(c.repeat), "sd seeds": _fmt(c.seed), "sd devices": _fmt(c.device),
        "effect / seed sd": _fmt(effect.in_seed_sds), "verdict": effect.status,
    }


def effect_table(sets: RunSets) -> pd.DataFrame:
    """One row per compared set and metric: the device effect, its interval, the tests, the components."""
    return pd.DataFrame([effect_rows(e, c.a.label.split(" ")[0], c.b.label.split(" ")[0])
                         for c in sets.comparisons for e in c.effects])


def verdict_lines(sets: RunSets) -> list[str]:
    """One line per comparison and metric: "S2 vs S1: accuracy equivalent: 90% CI ... inside +-3 pp ..."."""
    return [f"{c.b.label.split(' ')[0]} vs {c.a.label.split(' ')[0]}: {e.metric} {e.status.upper()}: {e.why}"
            for c in sets.comparisons for e in c.effects]


TEST_TEXT = ("Each set: N fine-tunes from N seeds (adapter init, data order, dropout) and the first seed once more "
             "(the same-seed floor). Spreads are of the N seed runs (sd with n - 1). Device effect = mean of the set "
             "minus the baseline set's mean. Equivalent: Welch's two one-sided t-tests (TOST) at alpha {alpha:g}, "
             "i.e. the 90% Welch interval inside +-margin. Differs: an exact two-sided permutation test of the mean "
             "difference (all relabellings of the runs) at alpha {alpha:g}. Otherwise inconclusive, and always "
             "below 3 seed runs a set; with 3 + 3 runs no permutation p can be below 0.1. Components: sd same seed "
             "= sqrt(mean d^2 / 2) of the repeat pairs, sd seeds = pooled within-set sd, sd devices = one-way "
             "ANOVA method of moments. Seeds are not paired across devices: the same seed does not draw the same "
             "adapter start or dropout masks on two devices' generators. Time to target (MLPerf): the first "
             "eval-curve point at or below the target, training seconds to it (compile warm-up plus step times), "
             "the mean with the fastest and slowest run dropped (a run that never reached it counts as slowest).")


def section_text(sets: RunSets) -> tuple[str, ...]:
    alpha = sets.comparisons[0].alpha if sets.comparisons else DEFAULT_ALPHA
    text = [TEST_TEXT.format(alpha=alpha)]
    if not sets.comparisons:
        text.append("One run set: its spread is shown; a device effect needs a second set (another device or "
                    "backend).")
    text += [f"- {line}" for line in verdict_lines(sets)]
    return tuple(text)


def draw_runset_chart(sets: RunSets, out_dir: Path) -> Path:
    """Training loss per step of each set as its seed runs' mean with the min-max band, and the eval curves
    (dots) beside; returns the PNG's path."""
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    train_ax, eval_ax = fig.subplots(1, 2)
    for i, s in enumerate(sets.summaries):
        color = _COLORS[i % len(_COLORS)]
        band = s.band
        if band.mean:
            x = np.arange(1, len(band.mean) + 1)
            train_ax.plot(x, band.mean, color=color, lw=1.2, label=f"{s.label} (mean of {len(s.seed_runs)})")
            train_ax.fill_between(x, band.low, band.high, color=color, alpha=0.2, lw=0)
        for j, r in enumerate(s.seed_runs):
            if r.curve:
                steps, losses = zip(*r.curve, strict=True)
                eval_ax.plot(steps, losses, color=color, lw=0.8, marker="o", ms=3, alpha=0.7,
                             label=s.label if j == 0 else None)
        target = s.time_to_target.target_nats
        if i == 0 and any(r.curve for r in s.seed_runs):
            eval_ax.axhline(target, color="#7f8c8d", ls=":", lw=1, label=f"target {target:g} nats")
    train_ax.set_title("training loss: mean and min-max over seeds", loc="left", fontsize=10, fontweight="bold")
    train_ax.set_xlabel("step")
    train_ax.set_ylabel("loss (nats)")
    eval_ax.set_title("eval loss (answer tokens) during fine-tuning", loc="left", fontsize=10, fontweight="bold")
    eval_ax.set_xlabel("step")
    for ax in (train_ax, eval_ax):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    path = out_dir / f"{CHART}.png"
    fig.savefig(path, dpi=110)
    return path
