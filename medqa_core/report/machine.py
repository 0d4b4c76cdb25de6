"""How does my machine compare? A user's run beside the committed runs of the same model on other hardware.

``medqa-parity compare`` prints this: the newest record of ``runs/records/`` (or one named), the committed
records (``results/runs/``) of the same model, kind and question set, one per other machine, and then what
``medqa-parity report`` would conclude of them (:func:`~medqa_core.report.build.build_report`), in one screen:
the verdict, its findings, and each figure with its ratio to the user's run. No statistics of its own and no
torch here.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medqa_core.compare.inputs import CompareError, RunSummary, _short_device, label_runs, summarize_file
from medqa_core.compare.metrics import METRICS, format_value
from medqa_core.compare.pairs import settings_differences
from medqa_core.compare.parity import DEFAULT_MARGIN_PP, Tolerances
from medqa_core.report.build import Report, build_report
from medqa_core.report.render import verdict_lines
from medqa_core.report.tables import metrics_table

WIDTH = 100  # one screen: every printed line fits in this many columns


@dataclass(frozen=True)
class MachineComparison:
    """A user's run and the committed runs it was compared with.

    Attributes:
        report: the report of the user's run (R1, the baseline) and the chosen committed runs.
        left_out: committed records of the same model that were not compared, each with the reason.
    """

    report: Report
    left_out: tuple[str, ...]


def newest_record(folder: str | Path) -> Path:
    """The newest run record in a folder (record file names start with their UTC time).

    Args:
        folder: where ``medqa-parity run`` saved its records (``--results``; default runs/records).

    Returns:
        The record's path.

    Raises:
        CompareError: no such folder, or no record in it; says what to run.
    """
    folder = Path(folder)
    records = sorted(folder.glob("*.json")) if folder.is_dir() else []
    if not records:
        raise CompareError(f"no run record in {folder}: run `medqa-parity run` first, or name a record "
                           "(medqa-parity compare RECORD)")
    return records[-1]


def _questions(run: RunSummary) -> dict[str, frozenset[str]]:
    return {phase: frozenset(q.qid for q in s.questions) for phase, s in run.phases.items()}


def _same_model(mine: RunSummary, other: RunSummary) -> bool:
    return (other.model_name, other.base_parameters, other.seed) == (mine.model_name, mine.base_parameters, mine.seed)


def choose_committed(mine: RunSummary, committed: Sequence[RunSummary]) -> tuple[list[RunSummary], list[str]]:
    """The committed runs to set beside the user's: same model, kind and questions, on other hardware.

    Of several runs on one machine (backend and device), the one whose settings differ least from the
    user's is taken, then the newest.

    Args:
        mine: the user's run.
        committed: every committed run.

    Returns:
        (chosen runs, one per machine in name order; why each other run of the same model was left out).
    """
    by_machine: dict[tuple[str, str], list[RunSummary]] = {}
    left_out = []
    for run in committed:
        if not _same_model(mine, run) or Path(run.path).resolve() == Path(mine.path).resolve():
            continue
        name = Path(run.path).name
        if run.kind != mine.kind:
            continue  # a train or evaluate record beside a run: not the same job
        if (run.backend, run.device) == (mine.backend, mine.device):
            continue  # the same machine as yours: not what this compares
        mine_q, theirs_q = _questions(mine), _questions(run)
        if any(mine_q[p] != theirs_q[p] for p in mine_q.keys() & theirs_q.keys()):
            n_mine = max(len(q) for q in mine_q.values())
            n_theirs = max(len(q) for q in theirs_q.values())
            left_out.append(f"{name}: scored {n_theirs} questions, yours {n_mine} (run with the same --data and "
                            "--eval-limit to be compared)")
            continue
        by_machine.setdefault((run.backend, run.device), []).append(run)
    chosen = []
    for machine in sorted(by_machine):
        runs = sorted(by_machine[machine], key=lambda r: r.created, reverse=True)  # newest first ...
        runs.sort(key=lambda r: len(settings_differences(mine, r)))  # ... of those set up most like yours
        chosen.append(runs[0])
    return chosen, left_out


def compare_machine(mine: str | Path, committed_dir: str | Path,
                    margin_pp: float = DEFAULT_MARGIN_PP) -> MachineComparison:
    """Compare a user's run record with the committed records of the same model on other hardware.

    Args:
        mine: the user's run record.
        committed_dir: the committed records (results/runs).
        margin_pp: accuracy equivalence margin in percentage points, as ``medqa-parity report --margin``.

    Returns:
        The comparison; its report's baseline (R1) is the user's run.

    Raises:
        CompareError: an unreadable record, no committed folder, or no committed run to compare with (the
            message names the models committed there).
    """
    try:
        tol = Tolerances(margin_pp=margin_pp)
    except ValueError as e:
        raise CompareError(f"--margin {margin_pp!r}: {e}") from e
    runs = summarize_file(mine)
    if len(runs) != 1 or runs[0].source != "record":
        raise CompareError(f"{mine}: a pytest-benchmark file; compare takes a run record (medqa-parity report "
                           "compares bench files)")
    (me,) = runs
    folder = Path(committed_dir)
    if not folder.is_dir():
        raise CompareError(f"{folder}: no such folder; run compare in a medqa-parity checkout or pass --committed "
                           "DIR (the repository's results/runs)")
    committed = [s for p in sorted(folder.glob("*.json")) for s in summarize_file(p)]
    chosen, left_out = choose_committed(me, committed)
    if not chosen:
        models = sorted({f"{r.kind} {r.model_name}" for r in committed if r.model_name})
        why = f"; left out: {'; '.join(left_out)}" if left_out else ""
        raise CompareError(f"{mine}: no committed {me.kind} record of {me.model_name} on other hardware than "
                           f"{me.device} in {folder} (there: {', '.join(models)}){why}")
    return MachineComparison(build_report(label_runs([me, *chosen]), tol), tuple(left_out))


def _column(run: RunSummary, mine: bool) -> str:
    return f"{run.rid} {'yours' if mine else _short_device(run.device, name_cpu=True)}"  # "R2 Xeon", not "R2 CPU"


def _cell(value: float, unit: str, label: str, ratio: float | None) -> str:
    if not math.isfinite(value):
        return f"invalid ({value})"
    text = format_value(value, unit)
    if unit and label.endswith(unit):  # "train tokens/s" needs no "tokens/s" in every cell
        text = text.removesuffix(f" {unit}")
    return text if ratio is None or math.isnan(ratio) else f"{text} ({ratio:.2f}x)"


def figure_rows(report: Report) -> list[list[str]]:
    """Each figure a run has, as table rows: header, then label and one cell per run ("1,234 (0.05x)").

    Ratios are to the baseline (the user's run), as in the report's performance table; accuracies are
    judged in the findings and shown without a ratio.
    """
    runs = report.runs
    header = ["", *(_column(r, i == 0) for i, r in enumerate(runs))]
    long = metrics_table(runs, report.baseline)
    rows = [header]
    for spec in METRICS:
        sub = long[long.metric == spec.label]
        if sub.empty:
            continue
        cells = {row.run: _cell(row.value, row.unit, spec.label, None if row.run == report.baseline.label
                                else row.ratio) for row in sub.itertuples()}
        rows.append([spec.label, *(cells.get(r.label, "-") for r in runs)])
    for phase in dict.fromkeys(p for r in runs for p in r.phases):
        cells = []
        for r in runs:
            s = r.phases.get(phase)
            cells.append("-" if s is None else f"{100 * s.accuracy:.1f}% of {s.n_questions}")
        rows.append([f"accuracy, {phase}", *cells])
    return rows


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
            .rstrip() for r in rows]


def _wrap(text: str, indent: str = "", more: str = "      ") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent, subsequent_indent=indent + more,
                         break_on_hyphens=False, break_long_words=False) or [indent]


def comparison_lines(comparison: MachineComparison) -> list[str]:
    """What ``medqa-parity compare`` prints: the runs, the verdict and its findings, the figures, the next step.

    Args:
        comparison: from :func:`compare_machine`.

    Returns:
        Lines of at most :data:`WIDTH` characters.
    """
    report = comparison.report
    me = report.runs[0]
    lines = []
    for r in report.runs:  # the path on a line of its own: it is copied, and may be wider than the screen
        lines += _wrap(f"{r.rid} {'yours' if r is me else 'committed':<9}  {r.backend}, {r.device}, {r.kernel}",
                       more=" " * 11)
        lines.append(f"{'':<14}{r.path}")
    lines.append("")
    head, findings = verdict_lines(report)
    lines += _wrap(head)
    for f in findings:
        lines += _wrap(f"{f.status.upper()}: {f.text}", indent="  ")
    lines.append("")
    lines += _table(figure_rows(report))
    lines += _wrap("Ratios are theirs / yours (R1): above 1x, tokens/s and questions/s are faster there, times "
                   "longer and memory larger.", more="")
    for why in comparison.left_out:
        lines += _wrap(f"not compared: {why}", more="  ")
    # One path a line, so that the command pastes into a shell as printed.
    lines += ["", "Tables, charts and fingerprints of the same runs:", "  medqa-parity report --out report/ \\"]
    lines += [f"    {r.path}" + (" \\" if i < len(report.runs) - 1 else "") for i, r in enumerate(report.runs)]
    return lines
