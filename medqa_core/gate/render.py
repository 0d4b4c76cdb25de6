"""The gate's result for people: the checks table, the verdict line, markdown for a CI job summary."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pandas as pd

from medqa_core.compare.metrics import SPEED_KEYS as SPEED
from medqa_core.compare.metrics import label as metric_label
from medqa_core.compare.parity import FAIL
from medqa_core.compare.tables import markdown_table
from medqa_core.gate.checks import INCONCLUSIVE, PASS, SKIP, Check, format_figure
from medqa_core.gate.decide import GateResult
from medqa_core.gate.thresholds import Thresholds


def checks_table(result: GateResult) -> pd.DataFrame:
    """One row per check: status, case, check, baseline, candidate, change, threshold, evidence.

    Args:
        result: the gate's result.

    Returns:
        The table, failures first, then inconclusive checks, then in check order.
    """
    rows = []
    for c in _ordered(result):
        rows.append({"status": _status(c), "case": c.case, "check": _check_name(c),
                     "baseline": format_figure(c.baseline, c.unit),
                     "candidate": format_figure(c.candidate, c.unit), "change": _change(c), "threshold": c.threshold,
                     "evidence": c.evidence})
    return pd.DataFrame(rows, columns=["status", "case", "check", "baseline", "candidate", "change", "threshold",
                                       "evidence"])


_ORDER = {FAIL: 0, INCONCLUSIVE: 1, PASS: 2, SKIP: 3}
WIDTH = 100  # the terminal text's widest line
LISTED = 20  # failures and checks that cannot be judged, listed in full after the verdict line


def _ordered(result: GateResult) -> list[Check]:
    return sorted(result.checks, key=lambda c: _ORDER[c.status])


def _status(c: Check) -> str:
    return c.status.upper() if c.failed or c.inconclusive else c.status


def _check_name(c: Check) -> str:
    return f"parity: {c.field}" if c.kind == "parity" else metric_label(c.field)


def _change(c: Check) -> str:
    if not math.isfinite(c.change):
        return "-"
    return f"{c.change:+.1f} pp" if c.kind == "accuracy" else f"{c.change:+.1f}%"


def wrap(text: str, indent: str = "", width: int = WIDTH) -> list[str]:
    """One line of text as lines of at most ``width`` characters, continuation lines indented 4 more; words
    are never broken, so joining the lines with spaces gives the text back."""
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "    ",
                         break_long_words=False, break_on_hyphens=False) or [indent]


def checks_text(result: GateResult, width: int = WIDTH) -> str:
    """The checks for a terminal: per case a heading, then per check one row (status, check, baseline,
    candidate, change; columns aligned) and below it the threshold and the evidence, wrapped: no line past
    ``width`` (a long word, such as a file path, excepted). Parity checks are named without "parity: " (their
    names say TOST, KL or loss).

    Args:
        result: the gate's result.
        width: the widest line.

    Returns:
        The text, failures first within each case.
    """
    checks = _ordered(result)
    cells = [(_status(c), c.field if c.kind == "parity" else metric_label(c.field), format_figure(c.baseline, c.unit),
              format_figure(c.candidate, c.unit), _change(c)) for c in checks]
    head = ("status", "check", "baseline", "candidate", "change")
    widths = [max(len(str(row[i])) for row in (head, *cells)) for i in range(len(head))]

    def row(values: tuple[str, ...]) -> str:
        return "  " + "  ".join(str(v).ljust(w) for v, w in zip(values, widths, strict=True)).rstrip()

    lines = [row(head)]
    for case in dict.fromkeys(c.case for c in checks):
        lines.append(case)
        for c, values in zip(checks, cells, strict=True):
            if c.case == case:
                lines.append(row(values))
                threshold = f"threshold {c.threshold}: " if c.threshold not in ("", "-") else ""
                lines += wrap(threshold + c.evidence, " " * 6, width)
    return "\n".join(lines)


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

    Checks not compared are counted with their reasons, so a pass on another machine says so; checks that
    cannot be judged are counted with theirs (:attr:`GateResult.unjudged`, listed below the line).
    """
    gated = [c for c in result.checks if c.status != SKIP]
    skipped = result.not_compared
    why = f": {not_compared_text(result)}" if skipped else ""
    unjudged = result.unjudged
    if not result.passed:
        also = f", {len(unjudged)} cannot be judged" if unjudged else ""
        return (f"gate: FAIL: {len(result.failures)} of {len(gated)} checks regressed{also}, {result.candidate} "
                f"against {result.baseline}" + (f" ({len(skipped)} not compared{why})" if skipped else ""))
    if unjudged:
        reasons: dict[str, int] = {}
        for c in unjudged:
            reasons[c.reason or "other"] = reasons.get(c.reason or "other", 0) + 1
        return (f"gate: INCONCLUSIVE: {len(unjudged)} of {len(result.checks)} checks cannot be judged ("
                + ", ".join(f"{r}: {n}" for r, n in reasons.items()) + f"), {result.candidate} against "
                f"{result.baseline}; neither a pass nor a failure: fix or rerun what is named below")
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
    if result.failures or result.unjudged:
        lines += [f"- **{c.message}**" for c in (*result.failures, *result.unjudged)] + [""]
    lines += [verdict_line(result), "", markdown_table(checks_table(result)), ""]
    lines += [f"> {n}" for n in result.notes]
    return "\n".join(lines).rstrip() + "\n"


def render_text(result: GateResult, width: int = WIDTH) -> str:
    """What ``medqa-parity gate`` prints: the checks, the notes, the verdict line, then every failure and every
    check that cannot be judged, each wrapped to ``width``.

    Args:
        result: the gate's result.
        width: the widest line (a long word, such as a file path, excepted).

    Returns:
        The text, without a final newline.
    """
    lines = [checks_text(result, width)] if len(result.checks) > 1 or result.checks[0].case != "files" else []
    for note in result.notes:
        lines += wrap(f"note: {note}", "", width)
    lines += wrap(verdict_line(result), "", width)
    listed = (*result.failures, *result.unjudged)
    for check in listed[:LISTED]:
        lines += wrap(check.message, "  ", width)
    if len(listed) > LISTED:
        lines.append(f"  ... and {len(listed) - LISTED} more, each in the table above")
    return "\n".join(lines)


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

