"""The gate's result for people: the checks table, the verdict line, markdown for a CI job summary."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from medqa_core.compare.metrics import SPEED_KEYS as SPEED
from medqa_core.compare.metrics import label as metric_label
from medqa_core.compare.parity import FAIL
from medqa_core.compare.tables import markdown_table
from medqa_core.gate.checks import PASS, SKIP, format_figure
from medqa_core.gate.decide import GateResult
from medqa_core.gate.thresholds import Thresholds


def checks_table(result: GateResult) -> pd.DataFrame:
    """One row per check: status, case, check, baseline, candidate, change, threshold, evidence.

    Args:
        result: the gate's result.

    Returns:
        The table, failures first, then in check order.
    """
    order = {FAIL: 0, PASS: 1, SKIP: 2}
    rows = []
    for c in sorted(result.checks, key=lambda c: order[c.status]):
        change = "-" if not math.isfinite(c.change) else (
            f"{c.change:+.1f} pp" if c.kind == "accuracy" else f"{c.change:+.1f}%")
        rows.append({"status": c.status.upper() if c.failed else c.status, "case": c.case,
                     "check": f"parity: {c.field}" if c.kind == "parity" else metric_label(c.field),
                     "baseline": format_figure(c.baseline, c.unit),
                     "candidate": format_figure(c.candidate, c.unit), "change": change, "threshold": c.threshold,
                     "evidence": c.evidence})
    return pd.DataFrame(rows, columns=["status", "case", "check", "baseline", "candidate", "change", "threshold",
                                       "evidence"])


def not_compared_text(result: GateResult) -> str:
    """Why checks were not compared, counted: "other CPU model: 12 speed and memory checks; single timing: 1 speed
    check"."""
    by_reason: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    for c in result.not_compared:
        reason = c.reason or "other"
        by_reason.setdefault(reason, set()).add(c.kind)
        counts[reason] = counts.get(reason, 0) + 1
    return "; ".join(f"{r}: {n} {' and '.join(sorted(by_reason[r], key=_KIND_ORDER.index))} check{'s' if n > 1 else ''}"
                     for r, n in counts.items())


_KIND_ORDER = ["speed", "memory", "accuracy", "parity"]


def verdict_line(result: GateResult) -> str:
    """"gate: PASS ...", "gate: FAIL, k of n checks regressed ..." or "gate: INCONCLUSIVE ...", one line.

    Checks not compared are counted with their reasons, so a pass on another machine says so.
    """
    gated = [c for c in result.checks if c.status != SKIP]
    skipped = result.not_compared
    why = f": {not_compared_text(result)}" if skipped else ""
    if not result.passed:
        return (f"gate: FAIL: {len(result.failures)} of {len(gated)} checks regressed, {result.candidate} "
                f"against {result.baseline}" + (f" ({len(skipped)} not compared{why})" if skipped else ""))
    if result.inconclusive:
        return (f"gate: INCONCLUSIVE: {len(skipped)} of {len(result.checks)} checks not compared{why}; "
                f"{result.candidate} against {result.baseline}. Gate against a baseline of the same kind, or "
                f"pass --allow-not-compared to accept the {len(gated)} checks that were compared")
    return (f"gate: PASS: {result.candidate} holds against {result.baseline} "
            f"({len(gated)} checks, {len(skipped)} not compared{why})")


def thresholds_text(t: Thresholds) -> str:
    """The thresholds in one line, as a reader needs them beside the table."""
    parts = [f"speed -{t.speed_pct:g}% (and Mann-Whitney p < {t.alpha:g} where rounds were kept)",
             f"memory +{t.memory_pct:g}%", f"accuracy -{t.accuracy_pp:g} pp (and McNemar p < {t.alpha:g} where paired)",
             f"parity margin +-{t.parity_margin_pp:g} pp, KL <= {t.kl_nats:g} nats"]
    parts += [f"{k} {'-' if k in SPEED else '+'}{v:g}%" for k, v in t.metric_pct]
    if t.allow_missing:
        parts.append(f"missing figures not compared: {', '.join(t.allow_missing)}")
    if t.machine_pct is not None:
        parts.append(f"speed not compared where every machine ceiling moved more than {t.machine_pct:g}%")
    if t.skip:
        parts.append(f"not gated: {', '.join(t.skip)}")
    return "; ".join(parts)


def render_markdown(result: GateResult) -> str:
    """The gate's result as markdown (for a GitHub step summary): verdict, thresholds, table, notes.

    Args:
        result: the gate's result.

    Returns:
        Markdown text ending in a newline.
    """
    mark = "FAIL" if not result.passed else "INCONCLUSIVE" if result.inconclusive else "PASS"
    lines = [f"## medqa-parity gate: {mark}", "", f"Candidate `{result.candidate}` against baseline "
             f"`{result.baseline}`.", "", f"Thresholds: {thresholds_text(result.thresholds)}.", ""]
    if result.failures:
        lines += [f"- **{c.message}**" for c in result.failures] + [""]
    lines += [verdict_line(result), "", markdown_table(checks_table(result)), ""]
    lines += [f"> {n}" for n in result.notes]
    return "\n".join(lines).rstrip() + "\n"


def append_step_summary(result: GateResult, path: str | Path) -> None:
    """Append the markdown result to a file (GitHub Actions' ``$GITHUB_STEP_SUMMARY``).

    Args:
        result: the gate's result.
        path: the summary file; created if missing.

    Raises:
        OSError: the file cannot be written.
    """
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(render_markdown(result) + "\n")

