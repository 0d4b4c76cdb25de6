"""Parity report: run records and pytest-benchmark files -> tables, charts, verdict, report.md/.html.

``medqa-parity report RUN RUN [RUN...] --out DIR`` reads every input into a
:class:`~medqa_core.summary.RunSummary` (:mod:`medqa_core.summary`), refuses runs that
cannot be compared, compares every run with the baseline (and each scored adapter with the run
that trained it) through :mod:`medqa_core.parity`, and writes ``report.md``, a self-contained
``report.html`` (charts inlined as base64 PNG) and the charts as PNG files.

No torch here: a report is built on any machine from the saved files.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from medqa_core.charts import draw_charts
from medqa_core.parity import (
    DEFAULT_MARGIN_PP,
    FAIL,
    FLAG,
    PASS,
    Finding,
    PairParity,
    ParityError,
    PhaseParity,
    Tolerances,
    compare_phase,
    judge_pair,
    loss_drift,
    quantization_differences,
    same_adapter,
)
from medqa_core.summary import (
    BASE,
    FINE_TUNED,
    METRICS,
    REFERENCE_ARM,
    ReportError,
    RunSummary,
    format_value,
    load_inputs,
)

logger = logging.getLogger(__name__)

_FINGERPRINT_HIDDEN = ("hostname",)  # identifies a person's machine, not its hardware


@dataclass(frozen=True)
class Report:
    """A built report: runs, comparisons, verdict; written by :func:`write_report`."""

    runs: tuple[RunSummary, ...]
    baseline: RunSummary
    pairs: tuple[PairParity, ...]
    adapter_pairs: tuple[PairParity, ...]
    findings: tuple[Finding, ...]
    tolerances: Tolerances
    notes: tuple[str, ...]

    @property
    def verdict(self) -> str:
        """"holds", "does not hold", or "not judged" (no per-question results in common)."""
        if any(not f.ok for f in self.findings):
            return "does not hold"
        judged = any(p.phases for p in (*self.pairs, *self.adapter_pairs))
        return "holds" if judged else "not judged"


# ---- comparing -------------------------------------------------------------------------------


def check_comparable(a: RunSummary, b: RunSummary) -> None:
    """Refuse two runs of different models.

    Args:
        a: one run (the baseline).
        b: another.

    Raises:
        ReportError: different model names, base parameter counts or preset seeds; names both files.
    """
    where = f"{b.path} ({b.label}) vs {a.path} ({a.label})"
    if None not in (a.model_name, b.model_name) and a.model_name != b.model_name:
        raise ReportError(f"{where}: different models, {b.model_name!r} vs {a.model_name!r}; compare runs of one "
                          "model (same --preset or --model)")
    if None not in (a.base_parameters, b.base_parameters) and a.base_parameters != b.base_parameters:
        raise ReportError(f"{where}: different model shapes, {b.base_parameters:,} vs {a.base_parameters:,} base "
                          "parameters")
    if None not in (a.seed, b.seed) and a.seed != b.seed:
        raise ReportError(f"{where}: different model weights, preset seed {b.seed} vs {a.seed}")


def compare_runs(a: RunSummary, b: RunSummary, tol: Tolerances) -> PairParity:
    """Compare run B with run A: each phase both scored, loss curves, quantization.

    Args:
        a: the reference of the pair (the baseline, or the run that trained an adapter).
        b: the other run.
        tol: margin, KL tolerance, alpha.

    Returns:
        The comparison.

    Raises:
        ReportError: different models, or different questions in a phase both scored.
    """
    check_comparable(a, b)
    phases: list[PhaseParity] = []
    for phase in (BASE, FINE_TUNED):
        pa, pb = a.phases.get(phase), b.phases.get(phase)
        if pa is None or pb is None or not pa.questions or not pb.questions:
            continue
        same = phase == BASE or same_adapter(a.adapter_dir, b.adapter_dir)
        try:
            phases.append(compare_phase(phase, pa.questions, pb.questions, same, tol))
        except ParityError as e:
            raise ReportError(f"{b.path} ({b.label}) vs {a.path} ({a.label}), {phase} scores: {e}") from e
    loss = loss_drift(a.loss_per_step, b.loss_per_step) if a.loss_per_step and b.loss_per_step else None
    # A case that ran out of memory before loading its model recorded no quantization: nothing to compare.
    quant = quantization_differences(a.quantization, b.quantization) if a.quantization and b.quantization else ()
    return PairParity(a.rid, b.rid, tuple(phases), loss, quant)


def adapter_trainers(runs: Sequence[RunSummary]) -> list[tuple[RunSummary, RunSummary]]:
    """(trainer, scorer) for each evaluate record that scored an adapter a run among the inputs trained.

    Args:
        runs: all runs.

    Returns:
        Pairs in input order.
    """
    trainers = [r for r in runs if r.kind in ("run", "train") and r.adapter_dir]
    scorers = [r for r in runs if r.kind == "evaluate" and r.adapter_dir]
    return [(t, s) for s in scorers for t in trainers if same_adapter(t.adapter_dir, s.adapter_dir)]


def build_report(runs: Sequence[RunSummary], tol: Tolerances) -> Report:
    """Compare every run with the first (the baseline) and every scored adapter with its trainer.

    Args:
        runs: from :func:`load_inputs`, baseline first.
        tol: what counts as parity.

    Returns:
        The report, with the verdict's findings.

    Raises:
        ReportError: runs that cannot be compared.
    """
    baseline, others = runs[0], runs[1:]
    pairs = tuple(compare_runs(baseline, r, tol) for r in others if r.kind != REFERENCE_ARM)
    adapter_pairs = tuple(compare_runs(t, s, tol) for t, s in adapter_trainers(runs) if t is not baseline)
    findings = tuple(f for p in (*pairs, *adapter_pairs) for f in judge_pair(p, tol))
    return Report(tuple(runs), baseline, pairs, adapter_pairs, findings, tol, _report_notes(runs))


def _report_notes(runs: Sequence[RunSummary]) -> tuple[str, ...]:
    notes = [f"{r.rid} is bench/'s reference arm (the common-guide QLoRA recipe on its own model folder): shown for "
             "speed and memory, not compared for parity." for r in runs if r.kind == REFERENCE_ARM]
    same: dict[tuple[Path, str, str], list[str]] = {}  # one file given twice (a benchmark file holds several runs)
    for r in runs:
        same.setdefault((Path(r.path).resolve(), r.kind, r.kernel), []).append(r.rid)
    for (path, _, _), ids in same.items():
        if len(ids) > 1:
            notes.append(f"{' and '.join(ids)} are the same run, read twice from {path}: they agree by construction.")
    backends = sorted({r.backend for r in runs})
    if "rocm" not in backends:
        notes.append(f"No ROCm run was compared: every input ran on {' / '.join(backends)}.")
    scorers = [r for r in runs if r.kind == "evaluate" and r.adapter_dir]
    for s in scorers:
        if not any(same_adapter(t.adapter_dir, s.adapter_dir) for t in runs if t.kind in ("run", "train")):
            notes.append(f"{s.label} scored adapter {s.adapter_dir}, whose training run is not among the inputs: "
                         "no cross-backend adapter check for it.")
    return tuple(notes)


# ---- tables ----------------------------------------------------------------------------------


def runs_table(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """One row per run: file, kind, backend, device, kernel, model, quantization.

    Args:
        runs: all runs.

    Returns:
        The table, one row per run in input order.
    """
    return pd.DataFrame([{
        "run": r.label, "file": Path(r.path).name, "kind": r.kind, "backend": r.backend, "device": r.device,
        "attention kernel": r.kernel, "model": r.model_name or "-", "quantization": _quant_text(r.quantization),
        "created": r.created,
    } for r in runs])


def _quant_text(q: Mapping[str, Any]) -> str:
    if not q:
        return "not recorded"
    if q.get("method") == "none":
        return "none (bf16)"
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
        for key, label, unit in METRICS:
            m = r.metrics.get(key)
            if m is None:
                continue
            base = baseline.metrics.get(key)
            ratio = m.value / base.value if base is not None and base.value else math.nan
            rows.append({"run": r.label, "metric": label, "unit": unit, "value": m.value,
                         "low": m.low, "high": m.high, "ratio": ratio})
    return pd.DataFrame(rows, columns=["run", "metric", "unit", "value", "low", "high", "ratio"])


def _metrics_display(long: pd.DataFrame, runs: Sequence[RunSummary]) -> pd.DataFrame:
    """:func:`metrics_table` as metric rows by run columns, each cell "value (ratio x)"."""
    if long.empty:
        return pd.DataFrame()
    cells = long.assign(cell=[_cell(v, u, r) for v, u, r in zip(long.value, long.unit, long.ratio, strict=True)])
    table = cells.pivot(index="metric", columns="run", values="cell")
    order = [label for _, label, _ in METRICS if label in table.index]
    table = table.reindex(index=order, columns=[r.label for r in runs]).astype(object).fillna("-")
    table.index.name = table.columns.name = None  # no extra header row in HTML
    return table


def _cell(value: float, unit: str, ratio: float) -> str:
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
            rows.append({"run": r.label, "phase": phase, "questions": s.n_questions,
                         "accuracy": f"{100 * s.accuracy:.1f}%", "95% CI (Wilson)": f"{100 * lo:.1f} - {100 * hi:.1f}",
                         "ratio to baseline": f"{s.accuracy / base.accuracy:.3f}x" if base and base.accuracy else "-"})
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
                "McNemar p": f"{a.mcnemar_p:.3g}", "discordant (vs only / run only)": f"{a.a_only} / {a.b_only}",
                "TOST p": f"{a.tost_p:.3g}", "equivalent": "yes" if a.equivalent else "NO",
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
    table = pd.DataFrame({r.label: [_text(f.get(k)) for k in keys] for r, f in zip(runs, flat, strict=True)},
                         index=keys)
    return _mark_differences(table)


def _mark_differences(table: pd.DataFrame) -> pd.DataFrame:
    """Prepend a "differs" column: "yes" where a row's values are not all equal."""
    differs = ["yes" if row.nunique() > 1 else "" for _, row in table.iterrows()]
    return table.assign(differs=differs)[["differs", *table.columns]]


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; lists become tuples, so values compare and hash."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One part of the report: heading, text paragraphs, an optional table and chart."""

    title: str
    text: tuple[str, ...] = ()
    table: pd.DataFrame | None = None
    index: bool = False  # show the table's index (row names)
    chart: str | None = None


def verdict_lines(report: Report) -> tuple[str, tuple[Finding, ...]]:
    """The headline and the findings: failures, then flags, then passes.

    Args:
        report: the built report.

    Returns:
        (headline, findings).
    """
    order = {FAIL: 0, FLAG: 1, PASS: 2}
    fails = [f for f in report.findings if f.status == FAIL]
    n = len(report.runs)
    if report.verdict == "does not hold":
        head = f"Parity does NOT hold: {len(fails)} point(s) fail across {n} runs (baseline {report.baseline.label})."
    elif report.verdict == "holds":
        head = f"Parity holds across {n} runs (baseline {report.baseline.label})."
    else:
        head = f"Parity not judged: the {n} runs share no per-question results to compare."
    return head, tuple(sorted(report.findings, key=lambda f: order[f.status]))


def _criteria_text(tol: Tolerances) -> str:
    """The rules the verdict applies, stated once in the report."""
    return (f"Criteria: accuracy equivalent within +-{tol.margin_pp:g} percentage points (paired TOST on the same "
            f"questions, both one-sided p < {tol.alpha:g}, i.e. the 90% CI inside the margin); where both runs scored "
            f"the same weights (the base model, or one saved adapter scored on two machines) mean KL divergence of "
            f"the four-option distributions <= {tol.kl_nats:g} nats and no NaN/inf; no NaN/inf training loss. "
            "Speed and memory are reported as ratios, not judged.")


def _sections(report: Report) -> list[Section]:
    """The report's parts after the verdict, in order."""
    runs, base, pairs = report.runs, report.baseline, (*report.pairs, *report.adapter_pairs)
    out = [
        Section("Runs compared", (f"Baseline: {base.label} ({base.path}); ratios are run / baseline.",),
                runs_table(runs)),
        Section("Performance", ("Ratios in parentheses are to the baseline; lower is better for time and memory.",),
                _metrics_display(metrics_table(runs, base), runs), index=True, chart="throughput"),
        Section("Memory", (), None, chart="memory"),
        Section("Accuracy", (), accuracy_table(runs, base), chart="accuracy"),
        Section("Statistical and numerical parity", (
            "diff = run minus vs, in percentage points; McNemar: exact two-sided test on the discordant questions; "
            "TOST: two one-sided z-tests of the paired difference against the margin; agreement: same predicted "
            "letter; KL: KL(vs || run) of the softmax over the four option log-probabilities.",),
            parity_table(pairs), chart="logprob_drift"),
        Section("Loss curves", (), loss_table(pairs), chart="loss"),
        Section("Cross-backend adapter check", _adapter_text(report)),
        Section("Quantization", ("Settings read back from a quantized layer of each run.",),
                quantization_table(runs), index=True),
        Section("Fingerprints", ("Everything recorded about each machine and software stack.",),
                fingerprint_table(runs), index=True),
    ]
    by_note: dict[str, list[str]] = {}
    for r in runs:
        for n in r.notes:
            by_note.setdefault(n, []).append(r.rid)
    notes = [f"{', '.join(ids)}: {n}" for n, ids in by_note.items()]
    if notes:
        out.append(Section("Notes from the runs", tuple(notes)))
    return out


def _adapter_text(report: Report) -> tuple[str, ...]:
    lines = []
    for a, b in adapter_trainers(report.runs):
        pair = next(p for p in (*report.pairs, *report.adapter_pairs) if (p.a, p.b) == (a.rid, b.rid))
        ft = next((ph for ph in pair.phases if ph.phase == FINE_TUNED), None)
        if ft is None:
            lines.append(f"{b.rid} scored the adapter {a.rid} trained, but {a.rid} has no fine-tuned scores.")
            continue
        ok = ft.logprobs.kl_mean <= report.tolerances.kl_nats and not ft.logprobs.nonfinite
        lines.append(f"{b.rid} ({b.backend}, {b.device}) scored the adapter trained by {a.rid} ({a.backend}, "
                     f"{a.device}): predictions "
                     f"agree on {100 * ft.accuracy.agreement:.1f}% of {ft.accuracy.n} questions, mean KL "
                     f"{ft.logprobs.kl_mean:.2e} nats: {'within' if ok else 'OUTSIDE'} the tolerance of "
                     f"{report.tolerances.kl_nats:g} nats.")
    return tuple(lines) or ("No evaluate record among the inputs scored an adapter trained by another input run.",)


def markdown_table(df: pd.DataFrame, index: bool = False) -> str:
    """A pipe table (no tabulate dependency); cells are str()-ed with pipes escaped."""
    if index:
        df = df.reset_index(names="")
    def row(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
    return "\n".join([row(df.columns), row("---" for _ in df.columns), *(row(r) for r in df.itertuples(index=False))])


def _render_markdown(report: Report, charts: Mapping[str, Path]) -> str:
    """report.md: verdict first, then each section; charts linked as PNG files beside it."""
    head, findings = verdict_lines(report)
    lines = ["# medqa-parity report", "", f"**{head}**", ""]
    lines += [f"- {f.status.upper()}: {f.text}" for f in findings]
    lines += ["", *[f"> {n}" for n in report.notes], "", _criteria_text(report.tolerances), ""]
    for s in _sections(report):
        lines += [f"## {s.title}", "", *[f"{t}\n" for t in s.text]]
        if s.table is not None and not s.table.empty:
            lines += [markdown_table(s.table, s.index), ""]
        if s.chart in charts:
            lines += [f"![{s.chart}]({charts[s.chart].name})", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1300px;color:#222;
 padding:0 1em;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #eee;padding-bottom:.2em;margin-top:1.8em}
.verdict{padding:1em 1.3em;border-radius:8px;margin:1em 0}
.holds{background:#eafaf1;border-left:8px solid #27ae60}.fails{background:#fdedec;border-left:8px solid #c0392b}
.notjudged{background:#fef9e7;border-left:8px solid #f1c40f}
.verdict h2{border:none;margin:0 0 .5em 0;font-size:1.3em}
.verdict li{margin:.25em 0}.pass{color:#1e8449;font-weight:bold}.fail{color:#c0392b;font-weight:bold}
.flag{color:#b9770e;font-weight:bold}
.note{background:#f4f6f7;padding:.6em 1em;border-radius:6px;margin:.4em 0}
.criteria{font-size:.9em;color:#555}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f6f7}tr:nth-child(even) td{background:#fbfcfc}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
"""


def _html_verdict(report: Report) -> str:
    head, findings = verdict_lines(report)
    css = {"holds": "holds", "does not hold": "fails"}.get(report.verdict, "notjudged")
    items = "".join(f"<li><span class='{f.status}'>{f.status.upper()}</span> "
                    f"{html.escape(f.text)}</li>" for f in findings)
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in report.notes)
    return (f"<div class='verdict {css}'><h2>{html.escape(head)}</h2><ul>{items}</ul></div>{notes}"
            f"<p class='criteria'>{html.escape(_criteria_text(report.tolerances))}</p>")


def _png_base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _render_html(report: Report, charts: Mapping[str, Path]) -> str:
    """report.html: the same content as report.md, self-contained (charts inlined as base64 PNG)."""
    body = ["<h1>medqa-parity report</h1>", _html_verdict(report)]
    for s in _sections(report):
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [f"<p>{html.escape(t)}</p>" for t in s.text]
        if s.table is not None and not s.table.empty:
            body.append(f"<div class='scroll'>{s.table.to_html(index=s.index, border=0, na_rep='-')}</div>")
        if s.chart in charts:
            body.append(f"<img alt='{s.chart}' src='data:image/png;base64,{_png_base64(charts[s.chart])}'>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>medqa-parity report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    """Write report.md, report.html and the chart PNGs under ``out_dir`` (created if needed).

    Args:
        report: the built report.
        out_dir: output folder.

    Returns:
        Paths written, report.md and report.html first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(report, out)
    md, page = out / "report.md", out / "report.html"
    md.write_text(_render_markdown(report, charts), encoding="utf-8")
    page.write_text(_render_html(report, charts), encoding="utf-8")
    logger.debug("wrote %s, %s and %d charts", md, page, len(charts))
    return [md, page, *charts.values()]


def make_report(paths: Sequence[str | Path], out_dir: str | Path, baseline: str | Path | None = None,
                margin_pp: float = DEFAULT_MARGIN_PP) -> tuple[Report, list[Path]]:
    """Read the inputs, compare them, write the report: what ``medqa-parity report`` does.

    Args:
        paths: run records and/or pytest-benchmark files.
        out_dir: output folder.
        baseline: the file others are compared with (default the first of ``paths``).
        margin_pp: accuracy equivalence margin in percentage points.

    Returns:
        The report and the paths written.

    Raises:
        ReportError: unreadable inputs, runs that cannot be compared, or a bad margin.
    """
    try:
        tol = Tolerances(margin_pp=margin_pp)
    except ValueError as e:
        raise ReportError(str(e)) from e
    report = build_report(load_inputs(paths, baseline), tol)
    return report, write_report(report, out_dir)
