"""What the gate compares: a run file as cases (a bench file's cases by name, a run record as one case).

Each case carries the report's summary of it alone (:mod:`medqa_core.compare.inputs`), the round times
behind its speed figures, and what it did (its workload): speed and memory compare only where that matches.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medqa_core.compare.inputs import (
    BenchFile,
    CompareError,
    RunSummary,
    read_result_file,
    record_settings,
    summarize_entries,
    summarize_record,
    summarize_result,
)
from medqa_core.compare.metrics import SPEED_KEYS
from medqa_core.compare.tables import flatten_dict
from medqa_core.gate.thresholds import GateError
from medqa_core.results.record import RunRecord

# Config entries of a run record that say where, not what: they may differ between comparable runs.
_CONFIG_IGNORED = ("results_dir", "backend", "model.path", "model.allow_pickle", "data.data_dir",
                   "train.checkpoint_every", "train.keep_checkpoints")


@dataclass(frozen=True)
class GateCase:
    """One comparable unit of a run file: a benchmark case, or a whole run record.

    Attributes:
        name: matching key (a benchmark case's name; "record" for a run record).
        summary: the report's summary of this case alone (metrics, phases, model).
        rounds: per speed metric, the per-round times (s) behind it; absent when not saved.
        timings: per speed metric, how many timed rounds its figure summarizes (1: a single timing),
            where known.
        workload: what the case did; speed and memory compare only where it matches.
        oom: what ran out of memory, in words, or None.
    """

    name: str
    summary: RunSummary
    rounds: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    timings: Mapping[str, int] = field(default_factory=dict)
    workload: Mapping[str, Any] = field(default_factory=dict)
    oom: str | None = None


def cases_from_record(record: RunRecord, path: str) -> tuple[GateCase, ...]:
    """A run record as one case: its timed train steps are the rounds of train tokens/s; its scoring
    questions/s is a single timing.

    Args:
        record: a loaded record.
        path: where it came from (for messages).

    Returns:
        One case named "record".
    """
    rounds: dict[str, tuple[float, ...]] = {}
    tr = record.train
    if tr is not None and tr.timed_steps > 0:
        rounds["train_tokens_per_s"] = tuple(tr.step_time_s[len(tr.step_time_s) - tr.timed_steps:])
    timings = {"train_tokens_per_s": len(rounds.get("train_tokens_per_s", ())), "questions_per_s": 1}
    summary = summarize_record(record, path)
    workload = {k: v for k, v in flatten_dict(record.config).items() if k not in _CONFIG_IGNORED}
    workload["compute_dtype"] = record_settings(record)["compute_dtype"]
    return (GateCase("record", summary, rounds, timings, workload, summary.oom.text if summary.oom else None),)


def cases_from_benchmark(bench: BenchFile) -> tuple[GateCase, ...]:
    """A pytest-benchmark file as one case per benchmark entry, summarized by the report's reader.

    Args:
        bench: the file, read by :func:`~medqa_core.compare.inputs.read_result_file`.

    Returns:
        Cases in file order; rounds are pytest-benchmark's per-round times where the file kept them.

    Raises:
        GateError: a case name given twice.
    """
    cases: list[GateCase] = []
    for entry in bench.entries:
        summary = summarize_entries([entry], bench.data, bench.path)
        speed = [k for k in SPEED_KEYS if k in summary.metrics]
        workload = {**{f"param {k}": v for k, v in entry.params.items()}, **entry.case.workload()}
        cases.append(GateCase(
            name=entry.name, summary=summary,
            rounds={k: entry.round_times_s for k in speed if entry.round_times_s},
            timings={k: entry.rounds for k in speed if entry.rounds is not None}, workload=workload,
            oom=entry.case.oom.text if entry.case.oom else None,
        ))
    names = [c.name for c in cases]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise GateError(f"{bench.path}: case {', '.join(twice)} appears twice; cannot tell which to compare")
    return tuple(cases)


def load_cases(path: str | Path) -> tuple[GateCase, ...]:
    """Read a run record or a pytest-benchmark file into gate cases.

    The file is read once, by the report's :func:`~medqa_core.compare.inputs.read_result_file` (kind, schema
    version and its migration, field types); the gate then splits a benchmark file into its cases.

    Args:
        path: the file.

    Returns:
        Its cases.

    Raises:
        GateError: missing or unreadable file, neither kind, another schema version, a figure of the
            wrong type; names the file.
    """
    try:
        result = read_result_file(path)
        if isinstance(result, RunRecord):
            return cases_from_record(result, str(path))
        summarize_result(result, str(path))  # the report's checks of the whole file (failure entries, ...)
        return cases_from_benchmark(result)
    except CompareError as e:
        raise GateError(str(e)) from e
