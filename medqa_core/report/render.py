"""Write a built report: report.md, a self-contained report.html (charts inlined) and the chart PNGs.

The folder is written under a temporary name beside the target and moved into place only when every
file is complete, so a failure never leaves a half-written or empty report folder.
"""

from __future__ import annotations

import base64
import html
import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from medqa_core.compare.inference import inference_rows
from medqa_core.compare.inputs import FINE_TUNED, BenchFile, CompareError, read_inputs, summarize_inputs
from medqa_core.compare.pairs import adapter_trainers
from medqa_core.compare.parity import DEFAULT_MARGIN_PP, FAIL, FLAG, PASS, Finding, Tolerances
from medqa_core.compare.runsets import DEFAULT_LOSS_MARGIN_NATS
from medqa_core.compare.tables import markdown_table
from medqa_core.report.build import Report, build_report
from medqa_core.report.charts import CHART_NAMES, draw_charts
from medqa_core.report.runsets import CHART as RUNSET_CHART
from medqa_core.report.runsets import draw_runset_chart, effect_table, load_runsets, section_text, spread_table
from medqa_core.report.tables import (
    accuracy_table,
    fingerprint_table,
    inference_table,
    loss_table,
    metrics_display,
    metrics_table,
    parity_table,
    quantization_table,
    runs_table,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Section:
    """One part of the report: heading, text paragraphs, an optional table and chart."""

    title: str
    text: tuple[str, ...] = ()
    table: pd.DataFrame | None = None
    index: bool = False  # show the table's index (row names)
    chart: str | None = None
    css: str = ""  # a class for the HTML table ("wrap": fixed layout, long values broken)


def inputs_text(report: Report) -> str:
    """What was compared, counted as files and what they hold: "3 run records", "2 bench files (4 arms/kernels)"."""
    parts = []
    for source, noun in (("record", "run record"), ("benchmark", "bench file")):
        runs = [r for r in report.runs if r.source == source]
        files = len({Path(r.path).resolve() for r in runs})
        if not runs:
            continue
        text = f"{files} {noun}{'s' if files != 1 else ''}"
        if len(runs) != files:
            text += f" ({len(runs)} arm/kernel summaries)"
        parts.append(text)
    return " and ".join(parts)


def verdict_lines(report: Report) -> tuple[str, tuple[Finding, ...]]:
    """The headline and the findings: failures, then flags, then passes.

    Args:
        report: the built report.

    Returns:
        (headline, findings).
    """
    order = {FAIL: 0, FLAG: 1, PASS: 2}
    fails = [f for f in report.findings if f.status == FAIL]
    n = inputs_text(report)
    if report.verdict == "does not hold":
        head = f"Parity does NOT hold: {len(fails)} point(s) fail across {n} (baseline {report.baseline.label})."
    elif report.verdict == "inconclusive":
        bad = report.invalid
        head = (f"Parity inconclusive: {len(bad)} figure(s) of {' and '.join(dict.fromkeys(r.rid for r, _ in bad))} "
                f"cannot be judged (not finite or incomplete, named in the notes) across {n} (baseline "
                f"{report.baseline.label}).")
    elif report.verdict == "holds":
        head = f"Parity holds across {n} (baseline {report.baseline.label})."
    elif any(p.measures_settings for p in (*report.pairs, *report.adapter_pairs)):
        head = (f"Parity not judged: the {n} ran on the same hardware with other settings; see what the settings "
                "alone change.")
    else:
        head = f"Parity not judged: the {n} share no per-question results to compare."
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
                metrics_display(metrics_table(runs, base), runs), index=True, chart="throughput"),
        Section("Memory", (), None, chart="memory"),
        Section("Accuracy", (), accuracy_table(runs, base), chart="accuracy"),
        Section("Statistical and numerical parity", (
            "diff = run minus vs, in percentage points; McNemar: exact two-sided test on the discordant questions; "
            "TOST: two one-sided z-tests of the paired difference against the margin; agreement: same predicted "
            "letter; KL: KL(vs || run) of the softmax over the four option log-probabilities.",),
            parity_table(pairs), chart="logprob_drift"),
        Section("Loss curves", (), loss_table(pairs), chart="loss"),
        Section("Inference", (
            "The compiled static decoder per 4-bit kernel (ours, the Triton NF4 kernels, and bitsandbytes' as arms of "
            "the same run) and batch: decode tokens/s count every row; the roofline is rows x the copy bandwidth "
            "measured in the run / the weight bytes a step reads.",), inference_table(report.inference), css="wrap")
        if report.inference else None,
        *runset_sections(report),
        Section("What the settings alone change", _settings_text(report)),
        Section("Cross-backend adapter check", _adapter_text(report)),
        Section("Quantization", ("Settings read back from a quantized layer of each run.",),
                quantization_table(runs), index=True, css="wrap"),
        Section("Fingerprints", ("Everything recorded about each machine and software stack; columns are the "
                                 "runs of the table above.",),
                fingerprint_table(runs), index=True, css="wrap"),
    ]
    out = [s for s in out if s is not None]
    by_note: dict[str, list[str]] = {}
    for r in runs:
        for n in r.notes:
            by_note.setdefault(n, []).append(r.rid)
    notes = [f"{', '.join(ids)}: {n}" for n, ids in by_note.items()]
    if notes:
        out.append(Section("Notes from the runs", tuple(notes)))
    return out


def runset_sections(report: Report) -> list[Section]:
    """The run sets' part of the report (none without run sets): spreads, then the device effects."""
    sets = report.runsets
    if sets is None:
        return []
    out = [Section("Run sets: the device effect against the seed spread", section_text(sets), spread_table(sets),
                   chart=RUNSET_CHART, css="wrap")]
    if sets.comparisons:
        out.append(Section("Run sets: device effect, by metric", (), effect_table(sets), css="wrap"))
    return out


def _settings_text(report: Report) -> tuple[str, ...]:
    """Pairs on one backend whose settings differ: how far the settings alone move the numbers, so a reader of a
    ROCm-vs-CUDA comparison can tell how much of a difference they explain."""
    runs = {r.rid: r for r in report.runs}
    lines = []
    for pair in (*report.pairs, *report.adapter_pairs):
        if not pair.measures_settings:
            continue
        a = runs[pair.a]
        where = f"both {a.backend}, {a.device}"
        parts = []
        for ph in pair.phases:
            lp, acc = ph.logprobs, ph.accuracy
            # The drift is what the settings change: on the base model directly (same weights or not, NF4 against
            # none), on the fine-tuned one through training (a training setting such as fp8 moves the adapter).
            drift = (f"log-probabilities |diff| mean {lp.mean_abs:.3g}, max {lp.max_abs:.3g} nats, mean KL "
                     f"{lp.kl_mean:.2e}; ")
            parts.append(f"{ph.phase}: {drift}predictions agree on {100 * acc.agreement:.1f}% of {acc.n}, accuracy "
                         f"{100 * acc.diff:+.2f} pp")
        if pair.loss is not None:
            parts.append(f"loss curves over {pair.loss.steps_compared} steps: |diff| mean {pair.loss.mean_abs:.3g}, "
                         f"max {pair.loss.max_abs:.3g}")
        lines.append(f"{pair.b} vs {pair.a} ({where}), {'; '.join(pair.settings_diffs)}: " + "; ".join(parts) + ".")
    return tuple(lines) or ("No two inputs ran on the same hardware with other settings (compute dtype, eval "
                            "packing, fp8 base matmuls, NF4 settings); compare such runs to see how much the settings "
                            "alone explain.",)


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
table.wrap{table-layout:fixed;width:100%}table.wrap td,table.wrap th{overflow-wrap:anywhere;word-break:break-word}
table.wrap th:first-child{width:22%}
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
            classes = [s.css] if s.css else None
            body.append(f"<div class='scroll'>{s.table.to_html(index=s.index, border=0, na_rep='-', classes=classes)}"
                        "</div>")
        if s.chart in charts:
            body.append(f"<img alt='{s.chart}' src='data:image/png;base64,{_png_base64(charts[s.chart])}'>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>medqa-parity report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    """Write report.md, report.html and the chart PNGs under ``out_dir``, all or nothing.

    Everything is written into a temporary folder beside ``out_dir`` first. A new ``out_dir`` is that
    folder renamed; into an existing one each file is moved (charts this report does not draw are
    removed, so none is left from an older report). Other files in ``out_dir`` are left alone.

    Args:
        report: the built report.
        out_dir: output folder (created if needed).

    Returns:
        Paths written, report.md and report.html first.

    Raises:
        OSError: the folder cannot be written; nothing was changed in ``out_dir``.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        charts = draw_charts(report.runs, report.baseline, (*report.pairs, *report.adapter_pairs), report.tolerances,
                             tmp)
        if report.runsets is not None:
            charts[RUNSET_CHART] = draw_runset_chart(report.runsets, tmp)
        (tmp / "report.md").write_text(_render_markdown(report, charts), encoding="utf-8")
        (tmp / "report.html").write_text(_render_html(report, charts), encoding="utf-8")
        names = ["report.md", "report.html", *(p.name for p in charts.values())]
        if not out.exists():
            tmp.rename(out)
        else:
            for name in (*CHART_NAMES, RUNSET_CHART):
                if f"{name}.png" not in names:
                    (out / f"{name}.png").unlink(missing_ok=True)
            for name in names:
                (tmp / name).replace(out / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.debug("wrote %s with %d charts", out, len(charts))
    return [out / name for name in names]


def make_report(paths: Sequence[str | Path], out_dir: str | Path, baseline: str | Path | None = None,
                margin_pp: float = DEFAULT_MARGIN_PP, runsets: Sequence[str | Path] = (),
                loss_margin_nats: float = DEFAULT_LOSS_MARGIN_NATS) -> tuple[Report, list[Path]]:
    """Read the inputs, compare them, write the report: what ``medqa-parity report`` does.

    Args:
        paths: run records and/or pytest-benchmark files.
        out_dir: output folder; written whole or not at all.
        baseline: the file others are compared with (default the first of ``paths``).
        margin_pp: accuracy equivalence margin in percentage points.
        runsets: run-set files (``run --repeats``): a section judges each set's device effect against the first
            set's; each set's first seed run also joins ``paths`` for the single-run paired statistics.
        loss_margin_nats: the run sets' eval-loss equivalence margin.

    Returns:
        The report and the paths written.

    Raises:
        CompareError: unreadable inputs, runs that cannot be compared, or a bad margin.
        OSError: the output folder cannot be written.
    """
    try:
        tol = Tolerances(margin_pp=margin_pp)
    except ValueError as e:
        raise CompareError(f"--margin {margin_pp!r}: {e}") from e
    sets = load_runsets(runsets, margin_pp, loss_margin_nats) if runsets else None
    if sets is not None:  # each set's first seed run stands for it in the single-run statistics
        seeds = [[r.path for r in s.runs if r.role == "seed"] for s in sets.summaries]
        # One set alone: its first two seeds, so the paired statistics show what a seed alone changes.
        firsts = seeds[0][:2] if len(seeds) == 1 and not paths else [s[0] for s in seeds]
        paths = [*paths, *firsts]
    results = read_inputs(paths, baseline)  # each file read once, for the runs and the inference table
    report = build_report(summarize_inputs(results), tol)
    report = replace(report, runsets=sets, inference=tuple(
        row for _, result in results if isinstance(result, BenchFile) for row in inference_rows(result)))
    return report, write_report(report, out_dir)
