"""Build a parity report: every run against the baseline, every scored adapter against its trainer.

:func:`build_report` is a pure function of the runs (from :func:`medqa_core.compare.inputs.load_inputs`);
:func:`medqa_core.report.render.make_report` reads the inputs, builds the report and writes it.
No torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medqa_core.compare.inference import InferenceRow
from medqa_core.compare.inputs import REFERENCE_ARM, SPEED_ONLY_ARMS, InvalidFigure, RunSummary
from medqa_core.compare.pairs import adapter_trainers, compare_runs, same_adapter
from medqa_core.compare.parity import Finding, PairParity, Tolerances, judge_pair


@dataclass(frozen=True)
class Report:
    """A built report: runs, comparisons, verdict; written by :func:`medqa_core.report.render.write_report`."""

    runs: tuple[RunSummary, ...]
    baseline: RunSummary
    pairs: tuple[PairParity, ...]
    adapter_pairs: tuple[PairParity, ...]
    findings: tuple[Finding, ...]
    tolerances: Tolerances
    notes: tuple[str, ...]
    runsets: Any = None  # report.runsets.RunSets: the run sets given, each against the first; None without
    inference: tuple[InferenceRow, ...] = ()  # the bench inputs' compiled decode per 4-bit kernel and batch

    @property
    def invalid(self) -> tuple[tuple[RunSummary, InvalidFigure], ...]:
        """Figures of the inputs that cannot be judged (NaN, inf, incomplete), each with its run."""
        return tuple((r, f) for r in self.runs for f in r.invalid)

    @property
    def verdict(self) -> str:
        """"holds", "does not hold", "inconclusive" (a figure of an input is not finite or incomplete: shown as
        invalid, never as a ratio), or "not judged" (no per-question results in common, or only pairs whose
        settings differ: those measure the settings, see the report's "What the settings alone change")."""
        if any(not f.ok for f in self.findings):
            return "does not hold"
        if self.invalid:
            return "inconclusive"
        judged = any(p.phases for p in (*self.pairs, *self.adapter_pairs) if not p.measures_settings)
        return "holds" if judged else "not judged"


def build_report(runs: Sequence[RunSummary], tol: Tolerances) -> Report:
    """Compare every run with the first (the baseline) and every scored adapter with its trainer.

    Args:
        runs: from :func:`load_inputs`, baseline first.
        tol: what counts as parity.

    Returns:
        The report, with the verdict's findings.

    Raises:
        CompareError: runs that cannot be compared.
    """
    baseline, others = runs[0], runs[1:]
    pairs = tuple(compare_runs(baseline, r, tol) for r in others if r.kind not in SPEED_ONLY_ARMS)
    adapter_pairs = tuple(compare_runs(t, s, tol) for t, s in adapter_trainers(runs) if t is not baseline)
    findings = tuple(f for p in (*pairs, *adapter_pairs) for f in judge_pair(p, tol))
    return Report(tuple(runs), baseline, pairs, adapter_pairs, findings, tol, _report_notes(runs))


def _report_notes(runs: Sequence[RunSummary]) -> tuple[str, ...]:
    notes = [f"{r.rid}: {f.text}: cannot be judged; shown as invalid, not compared." for r in runs for f in r.invalid]
    notes += [f"{r.rid} is bench/'s reference arm (the common-guide QLoRA recipe on its own model folder): shown for "
             "speed and memory, not compared for parity." for r in runs if r.kind == REFERENCE_ARM]
    notes += [f"{r.rid} is a peer stack's arm of bench/ (bench_peers.py): shown for speed and memory, not compared for "
              "parity." for r in runs if r.kind == "benchmark:peer"]
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
