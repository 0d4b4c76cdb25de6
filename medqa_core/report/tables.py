"""The report's tables (pandas): runs, performance, accuracy, parity, loss, inference, quantization, fingerprints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from medqa_core.compare.inference import InferenceRow
from medqa_core.compare.inputs import RunSummary
from medqa_core.compare.metrics import METRICS, format_value
from medqa_core.compare.parity import PairParity
from medqa_core.compare.stats import format_p
from medqa_core.compare.tables import flatten_dict

_FINGERPRINT_HIDDEN = ("hostname",)  # identifies a person's machine, not its hardware


def runs_table(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """One row per run: file, kind, backend, device, kernel, model, quantization.

    Args:
        runs: all runs.

    Returns:
        The table, one row per run in input order.
    """
    return pd.DataFrame([{
        "run": r.label, "file": Path(r.path).name, "kind": r.kind, "backend": r.backend, "device": r.device,
        "attention kernel": r.kernel, "model": r.model_name or "-", "quantization": _quant_text(r),
        "created": r.created,
    } for r in runs])


def _quant_text(run: RunSummary) -> str:
    q = run.quantization
    if not q:
        return "not recorded"
    if q.get("method") == "none":
        return f"none ({run.settings.get('compute_dtype')})"  # the dtype that ran, as recorded
    return f"{q.get('quant_type', '?')} blocksize {q.get('blocksize', '?')}, double quant {q.get('double_quant', '?')}"


def metrics_table(runs: Sequence[RunSummary], baseline: RunSummary) -> pd.DataFrame:
    """Performance figures in long form: run, metric, value, IQR band, ratio to the baseline.

    Args:
        runs: all runs.
        baseline: the run ratios are taken to.

    Returns:
        Columns run, metric, unit, value, low, high, ratio (NaN where the baseline lacks the figure).
    """
    rows = []
    for r in runs:
        for spec in METRICS:
            key, label, unit = spec.key, spec.label, spec.unit
            m = r.metrics.get(key)
            if m is None:
                continue
            base = baseline.metrics.get(key)
            # A ratio of a figure that is not finite would be a number made of nothing: shown as invalid instead.
            ratio = (m.value / base.value if base is not None and base.value and math.isfinite(base.value)
                     and math.isfinite(m.value) else math.nan)
            rows.append({"run": r.label, "metric": label, "unit": unit, "value": m.value,
                         "low": m.low, "high": m.high, "ratio": ratio})
    return pd.DataFrame(rows, columns=["run", "metric", "unit", "value", "low", "high", "ratio"])


def metrics_display(long: pd.DataFrame, runs: Sequence[RunSummary]) -> pd.DataFrame:
    """:func:`metrics_table` as metric rows by run columns, each cell "value (ratio x)"."""
    if long.empty:
        return pd.DataFrame()
    cells = long.assign(cell=[_cell(v, u, r) for v, u, r in zip(long.value, long.unit, long.ratio, strict=True)])
    table = cells.pivot(index="metric", columns="run", values="cell")
    order = [m.label for m in METRICS if m.label in table.index]
    table = table.reindex(index=order, columns=[r.label for r in runs]).astype(object).fillna("-")
    table.index.name = table.columns.name = None  # no extra header row in HTML
    return table


def _cell(value: float, unit: str, ratio: float) -> str:
    if not math.isfinite(value):
        return f"invalid ({value})"
    text = format_value(value, unit)
    return text if math.isnan(ratio) else f"{text} ({ratio:.2f}x)"


def accuracy_table(runs: Sequence[RunSummary], baseline: RunSummary) -> pd.DataFrame:
    """Accuracy of each run and phase with its Wilson 95% CI and ratio to the baseline's.

    Args:
        runs: all runs.
        baseline: the run ratios are taken to (per phase).

    Returns:
        One row per run and phase it scored.
    """
    rows = []
    for r in runs:
        for phase, s in r.phases.items():
            lo, hi = s.ci95
            base = baseline.phases.get(phase)
            valid = math.isfinite(lo)  # a finite fraction of the questions scored (PhaseScores.ci95)
            ratio = valid and base is not None and math.isfinite(base.ci95[0]) and base.accuracy
            rows.append({"run": r.label, "phase": phase, "questions": s.n_questions,
                         "accuracy": f"{100 * s.accuracy:.1f}%" if valid else f"invalid ({s.accuracy})",
                         "95% CI (Wilson)": f"{100 * lo:.1f} - {100 * hi:.1f}" if valid else "-",
                         "ratio to baseline": f"{s.accuracy / base.accuracy:.3f}x" if ratio else "-"})
    return pd.DataFrame(rows)


def parity_table(pairs: Sequence[PairParity]) -> pd.DataFrame:
    """Accuracy statistics and log-probability drift of compared pairs.

    Args:
        pairs: comparisons from :func:`compare_runs`.

    Returns:
        One row per pair and phase; "run" is B, "vs" is A of the pair.
    """
    rows = []
    for p in pairs:
        for ph in p.phases:
            a, lp = ph.accuracy, ph.logprobs
            rows.append({
                "run": p.b, "vs": p.a, "phase": ph.phase, "n": a.n, "diff (pp)": f"{100 * a.diff:+.2f}",
                "95% CI (bootstrap)": f"{100 * a.ci95[0]:+.2f} to {100 * a.ci95[1]:+.2f}",
                "McNemar p": format_p(a.mcnemar_p, bare=True),
                "discordant (vs only / run only)": f"{a.a_only} / {a.b_only}",
                "TOST p": format_p(a.tost_p, bare=True), "equivalent": "yes" if a.equivalent else "NO",
                "agreement": f"{100 * a.agreement:.1f}%", "logprob |diff| mean / max": f"{lp.mean_abs:.3g} / "
                f"{lp.max_abs:.3g}", "KL mean / max (nats)": f"{lp.kl_mean:.2e} / {lp.kl_max:.2e}",
                "same weights": "yes" if ph.same_weights else "no",
            })
    return pd.DataFrame(rows)


def loss_table(pairs: Sequence[PairParity]) -> pd.DataFrame:
    """Loss-curve drift of the pairs where both runs trained.

    Args:
        pairs: comparisons from :func:`compare_runs`.

    Returns:
        One row per pair with loss curves (empty when none has).
    """
    return pd.DataFrame([{
        "run": p.b, "vs": p.a, "steps": f"{p.loss.steps_b} / {p.loss.steps_a}", "common steps": p.loss.steps_compared,
        "max |diff|": f"{p.loss.max_abs:.4g}", "at step": p.loss.max_at_step, "mean |diff|": f"{p.loss.mean_abs:.4g}",
        "NaN/inf steps": f"{p.loss.nonfinite_b} / {p.loss.nonfinite_a}",
    } for p in pairs if p.loss is not None])


def quantization_table(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """Quantization settings by run.

    Args:
        runs: all runs.

    Returns:
        Settings as rows, runs as columns, after a "differs" column marking settings not equal across runs.
    """
    keys = sorted({k for r in runs for k in r.quantization})
    table = pd.DataFrame({r.label: [_text(r.quantization.get(k)) for k in keys] for r in runs}, index=keys)
    return _mark_differences(table)


def fingerprint_table(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """Every fingerprint field (nested ones flattened with dots) by run, after file, schema and time.

    The host name is left out: it names a person's machine, not its hardware.

    Args:
        runs: all runs.

    Returns:
        Fields as rows, runs as columns, after a "differs" column marking fields not equal across runs.
    """
    flat = [{"file": Path(r.path).name, "schema": r.schema, "created": r.created, **flatten_dict(r.fingerprint)}
            for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f if k.split(".")[-1] not in _FINGERPRINT_HIDDEN))
    # Columns by run id: full labels are in the runs table, and a wide page fits ids.
    table = pd.DataFrame({r.rid: [_text(f.get(k)) for k in keys] for r, f in zip(runs, flat, strict=True)},
                         index=keys)
    return _mark_differences(table)


def _mark_differences(table: pd.DataFrame) -> pd.DataFrame:
    """Prepend a "differs" column: "yes" where a row's values are not all equal."""
    differs = ["yes" if row.nunique() > 1 else "" for _, row in table.iterrows()]
    return table.assign(differs=differs)[["differs", *table.columns]]


def _text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)




def inference_table(rows: Sequence[InferenceRow]) -> pd.DataFrame:
    """Decode per device, 4-bit kernel and batch (compiled static decoder), with the first token and prefill."""
    return pd.DataFrame([{
        "device": r.device, "4-bit kernel": r.kernel_name, "batch": r.batch, "prefill": r.prefill,
        "time to first token": f"{r.ttft_s * 1e3:,.0f} ms" if r.ttft_s else "-",
        "prefill tokens/s": f"{r.prefill_tokens_per_s:,.0f}" if r.prefill_tokens_per_s else "-",
        "decode tokens/s": f"{r.decode_tokens_per_s:,.0f}",
        "of roofline": "-" if r.roofline_fraction is None else f"{100 * r.roofline_fraction:.1f}%",
        "joules/token": "-" if r.joules_per_token is None else f"{r.joules_per_token:.2f} J",
        "file": Path(r.path).name} for r in rows])
