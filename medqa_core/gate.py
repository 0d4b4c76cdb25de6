"""Regression gate: a candidate run against a baseline on speed, memory, accuracy and parity.

``medqa-parity gate --baseline RUN --candidate RUN`` reads both files with the report's loaders
(:func:`medqa_core.summary.summarize_file` and the summaries under it), matches their cases (a
pytest-benchmark file by case name: arm, kernel and parameters, e.g. ``test_train_ours[sdpa]``;
a run record with the other file's record) and checks every metric both sides measured against a
threshold from ``[tool.medqa-parity.gate]`` in pyproject.toml:

- speed (tokens/s of training, prefill and decode; scoring questions/s): fails when the candidate
  is slower than the baseline by more than ``speed_pct`` percent AND its round times are
  significantly longer (Mann-Whitney U, one-sided, p < ``alpha``). Where a side kept no per-round
  times (pytest-benchmark saves them with ``--benchmark-save-data``) the medians alone decide,
  and the check says so. Figures are compared raw. With ``machine_pct`` set, speed is not compared
  where every ceiling both runs measured of the machine (bench/ measures bf16 matmul FLOP/s and copy
  bandwidth at the start of its session) moved by more than that percent: as for other hardware, a
  busier or slower machine is not a regression. One ceiling moving alone is taken for the noise of
  its probe (on a shared CPU the matmul probe moves more than the cases do).
- memory (peak device memory, host RSS): fails when it grows by more than ``memory_pct`` percent,
  or when the candidate ran out of memory where the baseline did not.
- accuracy (per phase): fails when it drops by more than ``accuracy_pp`` points and, where both
  sides saved per-question results, McNemar's exact test on the questions both scored says the
  drop is real (one-sided p < ``alpha``).
- parity: the report's verdict (:func:`medqa_core.parity.judge_pair`): TOST equivalence within
  ``parity_margin_pp``, KL within ``kl_nats`` where both scored the same weights, finite losses.

A case whose workload differs (other batch, sequence length, question count, config) or that ran
on other hardware (GPU, or CPU model and thread count) is listed as not compared for speed and memory
rather than gated; its accuracy and parity are still checked. Decisions are pure functions of the
loaded cases (no torch).
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from scipy.stats import binomtest, mannwhitneyu

from medqa_core.parity import (
    FAIL,
    FLAG,
    ParityError,
    Tolerances,
    accuracy_parity,
    judge_pair,
    pair_questions,
)
from medqa_core.record import RunRecord, record_from_dict
from medqa_core.report import check_comparable, compare_runs, flatten_dict, markdown_table
from medqa_core.summary import (
    METRICS,
    PhaseScores,
    ReportError,
    RunSummary,
    read_json,
    summarize_benchmark,
    summarize_file,
    summarize_record,
)

PASS, SKIP = "pass", "not compared"  # and parity's FAIL ("fail")
SPEED = ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_compiled_tokens_per_s",
         "questions_per_s")
MEMORY = ("peak_mem_gib", "host_rss_gib")
# What a benchmark case did (as bench/ puts it in extra_info): speed and memory compare only when these match.
WORKLOAD_KEYS = ("batch_size", "seq_len", "seq_len_max", "tokens_per_step", "questions", "eval_batch_size",
                 "new_tokens", "cache", "compile_mode", "decode_loop", "gradient_checkpointing", "packing",
                 "prompt_tokens")
# Config entries of a run record that say where, not what: they may differ between comparable runs.
_CONFIG_IGNORED = ("results_dir", "backend", "model.path", "model.allow_pickle", "data.data_dir",
                   "train.checkpoint_every", "train.keep_checkpoints")
_LABELS = {key: label for key, label, _ in METRICS}
_UNITS = {key: unit for key, _, unit in METRICS}
_EPS = 1e-9  # a change exactly at the threshold holds, whatever the float rounding
# The machine's ceilings bench/ measures at the start of its session (fingerprint["hardware"]) -> label.
MACHINE = {"matmul_bf16_flops_per_s": "matmul FLOP/s", "copy_bandwidth_bytes_per_s": "copy bandwidth"}
CONFIG_TABLE = ("tool", "medqa-parity", "gate")


class GateError(ValueError):
    """Bad input: a file that cannot be read, bad thresholds, or runs that cannot be compared."""


@dataclass(frozen=True)
class Thresholds:
    """How much worse the candidate may be before the gate fails.

    Attributes:
        speed_pct: allowed drop of a throughput, percent of the baseline (> 0).
        memory_pct: allowed growth of peak memory, percent of the baseline (> 0).
        accuracy_pp: allowed drop of accuracy, percentage points (> 0).
        parity_margin_pp: equivalence margin of the parity verdict (TOST), percentage points.
        kl_nats: highest mean KL divergence of same-weights scores in the parity verdict.
        alpha: significance level of the speed, accuracy and parity tests.
        machine_pct: speed is not compared where every machine ceiling both runs measured (matmul
            FLOP/s, copy bandwidth) moved by more than this percent (> 0); None: not checked.
        metric_pct: per-metric overrides of speed_pct / memory_pct, by metric key
            (e.g. ``(("decode_tokens_per_s", 30.0),)``); set as ``<metric>_pct``.
        skip: metric keys, or "speed", "memory", "accuracy", "parity", not gated.
    """

    speed_pct: float = 10.0
    memory_pct: float = 10.0
    accuracy_pp: float = 2.0
    parity_margin_pp: float = 3.0
    kl_nats: float = 0.01
    alpha: float = 0.05
    machine_pct: float | None = None
    metric_pct: tuple[tuple[str, float], ...] = ()
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("speed_pct", "memory_pct", "accuracy_pp", "parity_margin_pp"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise GateError(f"threshold {name}={value!r}: give the allowed change as a positive number "
                                f"(e.g. {name}=10 fails on a change of more than 10 in the bad direction)")
        m = self.machine_pct
        if m is not None and not (isinstance(m, int | float) and math.isfinite(m) and m > 0):
            raise GateError(f"threshold machine_pct={m!r}: give a positive percent (e.g. machine_pct=10 leaves speed "
                            "not compared where every ceiling the runs measured moved by more than 10%)")
        if not (isinstance(self.kl_nats, int | float) and self.kl_nats >= 0):
            raise GateError(f"threshold kl_nats={self.kl_nats!r}: must be >= 0 nats")
        if not (isinstance(self.alpha, int | float) and 0 < self.alpha < 1):
            raise GateError(f"threshold alpha={self.alpha!r}: must be between 0 and 1 (e.g. 0.05)")
        for key, value in self.metric_pct:
            if key not in (*SPEED, *MEMORY):
                raise GateError(f"threshold {key}_pct: no metric {key!r}; per-metric thresholds exist for "
                                f"{', '.join(f'{k}_pct' for k in (*SPEED, *MEMORY))}")
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise GateError(f"threshold {key}_pct={value!r}: give the allowed change as a positive number")
        known = {*SPEED, *MEMORY, "speed", "memory", "accuracy", "parity"}
        unknown = [s for s in self.skip if s not in known]
        if unknown:
            raise GateError(f"skip: unknown {', '.join(map(repr, unknown))}; use speed, memory, accuracy, parity "
                            f"or a metric key ({', '.join((*SPEED, *MEMORY))})")

    def pct(self, metric: str) -> float:
        """The percent threshold of one speed or memory metric (its override, else its kind's)."""
        overrides = dict(self.metric_pct)
        if metric in overrides:
            return overrides[metric]
        return self.speed_pct if metric in SPEED else self.memory_pct

    def gated(self, kind: str, metric: str | None = None) -> bool:
        """Whether checks of ``kind`` (and ``metric``) are gated, i.e. not in ``skip``."""
        return kind not in self.skip and (metric is None or metric not in self.skip)

    @property
    def tolerances(self) -> Tolerances:
        """The parity verdict's tolerances."""
        return Tolerances(margin_pp=self.parity_margin_pp, kl_nats=self.kl_nats, alpha=self.alpha)


@dataclass(frozen=True)
class Check:
    """One metric of one case, baseline against candidate.

    Attributes:
        case: the case ("test_train_ours[sdpa]", or "run" for a run record).
        kind: "speed", "memory", "accuracy" or "parity".
        field: what was compared (a metric key, "accuracy (base)", a parity point).
        status: "pass", "fail" or "not compared".
        baseline, candidate: the figures (NaN when not applicable), in ``unit``.
        unit: unit of the figures ("tokens/s", "GiB", "%", "").
        change: candidate vs baseline: percent for speed and memory, points for accuracy (NaN if none).
        threshold: the allowed change, signed in the bad direction ("-10%", "+10%", "-2 pp").
        evidence: the test behind the decision ("Mann-Whitney p=0.004, 5 vs 5 rounds", "median only: ...").
        message: one line naming the case, field, change and threshold.
    """

    case: str
    kind: str
    field: str
    status: str
    baseline: float
    candidate: float
    unit: str
    change: float
    threshold: str
    evidence: str
    message: str

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass(frozen=True)
class GateResult:
    """Every check of a candidate against its baseline, and the verdict.

    Attributes:
        baseline, candidate: the files compared.
        thresholds: what was allowed.
        checks: in case order, then speed, memory, accuracy, parity.
        notes: cases on one side only, parity flags, subsets compared.
    """

    baseline: str
    candidate: str
    thresholds: Thresholds
    checks: tuple[Check, ...]
    notes: tuple[str, ...] = ()

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.failed)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        """0 when the candidate holds, 1 when something regressed."""
        return 0 if self.passed else 1


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
        oom: what ran out of memory, or None.
    """

    name: str
    summary: RunSummary
    rounds: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    timings: Mapping[str, int] = field(default_factory=dict)
    workload: Mapping[str, Any] = field(default_factory=dict)
    oom: str | None = None


# ---- reading ---------------------------------------------------------------------------------


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
    oom = None
    if record.failure:
        oom = f"{record.failure.get('kind', 'failure')} during {record.failure.get('phase', '?')}"
    workload = {k: v for k, v in flatten_dict(record.config).items() if k not in _CONFIG_IGNORED}
    return (GateCase("record", summarize_record(record, path), rounds, timings, workload, oom),)


def cases_from_benchmark(data: Mapping[str, Any], path: str) -> tuple[GateCase, ...]:
    """A pytest-benchmark file as one case per benchmark entry, summarized by the report's loader.

    Args:
        data: the parsed file.
        path: where it came from.

    Returns:
        Cases in file order; rounds are ``stats["data"]`` where the file kept them.

    Raises:
        GateError: not a file of medqa-parity's bench/, or a case name given twice.
    """
    cases: list[GateCase] = []
    for entry in data.get("benchmarks") or []:
        if not isinstance(entry, dict):
            continue
        try:
            (summary,) = summarize_benchmark({**data, "benchmarks": [entry]}, path)
        except ReportError as e:
            raise GateError(str(e)) from e
        ei = entry.get("extra_info") or {}
        times = (entry.get("stats") or {}).get("data")
        rounds = tuple(float(t) for t in times) if isinstance(times, list) and times else ()
        n = (entry.get("stats") or {}).get("rounds")
        workload = {**{f"param {k}": v for k, v in (entry.get("params") or {}).items()},
                    **{k: ei[k] for k in WORKLOAD_KEYS if k in ei}}
        oom = ei.get("oom")
        during = (oom if isinstance(oom, dict) else {}).get("during", "?")
        cases.append(GateCase(
            name=str(entry.get("name") or entry.get("fullname") or f"case {len(cases) + 1}"), summary=summary,
            rounds={k: rounds for k in SPEED if k in summary.metrics and rounds},
            timings={k: int(n) for k in SPEED if k in summary.metrics and isinstance(n, int)}, workload=workload,
            oom=None if oom is None else f"out of memory during {during}",
        ))
    names = [c.name for c in cases]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise GateError(f"{path}: case {', '.join(twice)} appears twice; cannot tell which to compare")
    return tuple(cases)


def load_cases(path: str | Path) -> tuple[GateCase, ...]:
    """Read a run record or a pytest-benchmark file into gate cases.

    The report's :func:`~medqa_core.summary.summarize_file` checks the file first (kind, schema
    version, fields); the gate then splits a benchmark file into its cases.

    Args:
        path: the file.

    Returns:
        Its cases.

    Raises:
        GateError: missing or unreadable file, neither kind, another schema version; names the file.
    """
    path = Path(path)
    try:
        summaries = summarize_file(path)
        data = read_json(path)
    except ReportError as e:
        raise GateError(str(e)) from e
    if summaries[0].source == "record":
        return cases_from_record(record_from_dict(data, where=str(path)), str(path))
    return cases_from_benchmark(data, str(path))


# ---- thresholds --------------------------------------------------------------------------------


def find_pyproject(start: str | Path) -> Path | None:
    """The nearest pyproject.toml in ``start`` or a folder above it.

    Args:
        start: where to begin (usually the working directory).

    Returns:
        Its path, or None when there is none up to the root.
    """
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def read_gate_table(path: str | Path) -> dict[str, Any]:
    """The ``[tool.medqa-parity.gate]`` table of a pyproject.toml, or of another TOML file such as
    this project's ``.ci/gate.toml`` (empty when it has none).

    Args:
        path: the TOML file.

    Returns:
        The table's keys and values.

    Raises:
        GateError: the file is missing, unreadable or not TOML, or the entry is not a table.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise GateError(f"{path}: cannot read ({e.strerror}); give --config a TOML file with a "
                        f"[{'.'.join(CONFIG_TABLE)}] table (pyproject.toml, .ci/gate.toml)") from e
    except tomllib.TOMLDecodeError as e:
        raise GateError(f"{path}: not TOML ({e})") from e
    table: Any = doc
    for key in CONFIG_TABLE:
        table = table.get(key, {}) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        raise GateError(f"{path}: [{'.'.join(CONFIG_TABLE)}] is not a table")
    return table


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings from the command line as threshold values.

    Args:
        items: e.g. ``["speed_pct=40", "memory_pct=25"]``.

    Returns:
        Name -> float.

    Raises:
        GateError: an item without ``=`` or with a value that is not a number.
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError as e:
            raise GateError(f"--threshold {item!r}: expected NAME=NUMBER, e.g. speed_pct=10 or accuracy_pp=2") from e
    return out


def thresholds_from_mapping(values: Mapping[str, Any], where: str = "thresholds") -> Thresholds:
    """Build thresholds from pyproject keys and command-line overrides (unknown names are refused).

    Args:
        values: e.g. ``{"speed_pct": 10, "decode_tokens_per_s_pct": 30, "skip": ["parity"]}``.
        where: named in error messages (the file, or "--threshold").

    Returns:
        The thresholds; keys not given keep their defaults.

    Raises:
        GateError: an unknown name or a bad value.
    """
    plain = {f.name for f in dataclasses.fields(Thresholds)} - {"metric_pct", "skip"}
    kwargs: dict[str, Any] = {}
    per_metric: dict[str, float] = {}
    for name, value in values.items():
        if name in plain:
            kwargs[name] = value
        elif name == "skip":
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise GateError(f"{where}: skip must be a list of names, e.g. skip = [\"parity\"]")
            kwargs["skip"] = tuple(value)
        elif name.endswith("_pct") and name.removesuffix("_pct") in (*SPEED, *MEMORY):
            per_metric[name.removesuffix("_pct")] = value
        else:
            known = sorted(plain) + [f"{k}_pct" for k in (*SPEED, *MEMORY)] + ["skip"]
            raise GateError(f"{where}: unknown threshold {name!r}; known: {', '.join(known)}")
    for name, value in kwargs.items():
        if name != "skip" and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise GateError(f"{where}: {name} = {value!r} is not a number")
    return Thresholds(**kwargs, metric_pct=tuple(sorted(per_metric.items())))


def load_thresholds(config: str | Path | None, overrides: Sequence[str], start: str | Path = ".") -> Thresholds:
    """Thresholds from ``--config`` (or the nearest pyproject.toml above ``start``), then ``--threshold``.

    Args:
        config: a pyproject.toml given on the command line, or None to search.
        overrides: ``NAME=VALUE`` items; they win over the file.
        start: where the search for pyproject.toml begins.

    Returns:
        The thresholds (defaults for keys given nowhere).

    Raises:
        GateError: unreadable config, unknown names, bad values.
    """
    path = Path(config) if config is not None else find_pyproject(start)
    table = read_gate_table(path) if path is not None else {}
    where = str(path) if path is not None else "defaults"
    file_values = thresholds_from_mapping(table, where)  # checked alone, so an error names the file
    merged = {**table, **parse_overrides(overrides)}
    return file_values if not overrides else thresholds_from_mapping(merged, "--threshold")


# ---- decisions (pure) --------------------------------------------------------------------------


def _fmt(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "-"
    if unit == "%":
        return f"{value:.1f}%"
    if unit in ("tokens/s", "questions/s") and abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}".strip()


def speed_check(case: str, metric: str, baseline: float, candidate: float, baseline_rounds: Sequence[float],
                candidate_rounds: Sequence[float], threshold_pct: float, alpha: float,
                baseline_timings: int | None = None, candidate_timings: int | None = None,
                machine: str = "") -> Check:
    """Gate one throughput (higher is better) on the change of its value and the rounds behind it.

    Fails when the candidate is lower by more than ``threshold_pct`` percent and its round times
    are significantly longer (Mann-Whitney U, one-sided, p < alpha). Where a side kept no round
    times, or too few for any outcome to reach alpha (3 vs 3 rounds: p >= 0.05), the values alone
    decide, and ``evidence`` says so: a test that cannot fail would let every slowdown through.
    A figure from a single timing (a run record's scoring) has no spread to tell a slowdown from
    noise: it is not compared.

    Args:
        case: case name.
        metric: metric key (e.g. "train_tokens_per_s").
        baseline: the baseline's figure.
        candidate: the candidate's figure.
        baseline_rounds: baseline round times in seconds (empty when not saved).
        candidate_rounds: candidate round times in seconds.
        threshold_pct: allowed drop in percent (> 0).
        alpha: significance level.
        baseline_timings: timed rounds behind the baseline's figure, where known (1: a single timing).
        candidate_timings: the same for the candidate.
        machine: what the machine check found (:func:`machine_state`), added to the evidence.

    Returns:
        The check.
    """
    label, unit = _LABELS.get(metric, metric), _UNITS.get(metric, "")
    threshold = f"-{threshold_pct:g}%"
    single = [side for side, n in (("baseline", baseline_timings), ("candidate", candidate_timings)) if n == 1]
    if single:
        why = f"a single timing in the {' and '.join(single)}: no spread to tell a slowdown from noise"
        return Check(case, "speed", metric, SKIP, baseline, candidate, unit, math.nan, threshold, why,
                     f"{case}: {label} not compared: {why}")
    if not (math.isfinite(baseline) and baseline > 0 and math.isfinite(candidate)):
        return Check(case, "speed", metric, SKIP, baseline, candidate, unit, math.nan, threshold,
                     "no finite baseline figure", f"{case}: {label} not compared: baseline {baseline}, candidate "
                     f"{candidate}")
    change = 100 * (candidate / baseline - 1)
    beyond = change < -threshold_pct - _EPS
    n_b, n_c = len(baseline_rounds), len(candidate_rounds)
    # The smallest one-sided p-value Mann-Whitney can give: every candidate round slower than every baseline one.
    smallest_p = 1 / math.comb(n_b + n_c, n_c) if n_b and n_c else 1.0
    if smallest_p < alpha:
        # One-sided: are the candidate's round times stochastically greater (slower)?
        p = float(mannwhitneyu(candidate_rounds, baseline_rounds, alternative="greater").pvalue)
        evidence = f"Mann-Whitney p={p:.3g} ({n_c} vs {n_b} rounds)"
        failed = beyond and p < alpha
        if beyond and not failed:
            evidence += f": not significant at {alpha:g}"
    else:
        missing = " and ".join(side for side, n in (("baseline", n_b), ("candidate", n_c)) if n < 2)
        why = (f"no per-round times in the {missing} (a pytest-benchmark file keeps them with --benchmark-save-data)"
               if missing else f"{n_c} vs {n_b} rounds cannot reach p < {alpha:g} (smallest p {smallest_p:.3g})")
        evidence = f"median only, not tested for significance: {why}"
        failed = beyond
    if machine:
        evidence += f"; raw {unit}, {machine}"
    status = FAIL if failed else PASS
    verb = "regressed" if failed else "holds"
    message = (f"{case}: {label} {change:+.1f}% vs baseline (threshold {threshold}), {evidence}; {verb} "
               f"({_fmt(candidate, unit)} vs {_fmt(baseline, unit)})")
    return Check(case, "speed", metric, status, baseline, candidate, unit, change, threshold, evidence, message)


def memory_check(case: str, metric: str, baseline: float, candidate: float, threshold_pct: float) -> Check:
    """Gate one peak memory figure (lower is better): fails when it grows by more than ``threshold_pct``.

    Args:
        case: case name.
        metric: "peak_mem_gib" or "host_rss_gib".
        baseline: the baseline's peak, GiB.
        candidate: the candidate's peak, GiB.
        threshold_pct: allowed growth in percent (> 0).

    Returns:
        The check.
    """
    label = _LABELS.get(metric, metric)
    threshold = f"+{threshold_pct:g}%"
    if not (math.isfinite(baseline) and baseline > 0 and math.isfinite(candidate)):
        return Check(case, "memory", metric, SKIP, baseline, candidate, "GiB", math.nan, threshold,
                     "no finite baseline figure", f"{case}: {label} not compared")
    change = 100 * (candidate / baseline - 1)
    failed = change > threshold_pct + _EPS
    message = (f"{case}: {label} {change:+.1f}% vs baseline (threshold {threshold}); "
               f"{'regressed' if failed else 'holds'} ({candidate:.3g} GiB vs {baseline:.3g} GiB)")
    return Check(case, "memory", metric, FAIL if failed else PASS, baseline, candidate, "GiB", change, threshold,
                 "peak of the case", message)


def common_questions(a: PhaseScores, b: PhaseScores) -> tuple[PhaseScores, PhaseScores]:
    """Both runs' scores restricted to the questions both scored (by qid), accuracy recomputed.

    Args:
        a: one run's scores of a phase, with per-question results.
        b: the other run's.

    Returns:
        The two restricted scores, each in its own order (empty when no question is shared).
    """
    shared = {q.qid for q in a.questions} & {q.qid for q in b.questions}

    def keep(s: PhaseScores) -> PhaseScores:
        qs = tuple(q for q in s.questions if q.qid in shared)
        return PhaseScores(sum(q.correct for q in qs) / len(qs) if qs else math.nan, len(qs), qs)

    return keep(a), keep(b)


def accuracy_check(case: str, phase: str, baseline: PhaseScores, candidate: PhaseScores, threshold_pp: float,
                   alpha: float) -> Check:
    """Gate one phase's accuracy: fails on a drop of more than ``threshold_pp`` points.

    With per-question results on both sides the drop must also be significant: McNemar's exact
    test on the discordant questions, one-sided (more questions only the baseline got right),
    p < alpha. Without them the accuracies alone decide, and only over the same number of questions.

    Args:
        case: case name.
        phase: "base" or "fine-tuned".
        baseline: the baseline's scores (restricted to shared questions when paired).
        candidate: the candidate's.
        threshold_pp: allowed drop, percentage points (> 0).
        alpha: significance level.

    Returns:
        The check.
    """
    field_name, threshold = f"accuracy ({phase})", f"-{threshold_pp:g} pp"
    a, b = 100 * baseline.accuracy, 100 * candidate.accuracy
    if baseline.questions and candidate.questions:
        try:
            paired = accuracy_parity(pair_questions(baseline.questions, candidate.questions), alpha=alpha)
        except ParityError as e:
            return Check(case, "accuracy", field_name, SKIP, a, b, "%", math.nan, threshold, str(e),
                         f"{case}: {field_name} not compared: {e}")
        drop = -100 * paired.diff
        k = paired.a_only + paired.b_only
        p = float(binomtest(paired.a_only, k, 0.5, alternative="greater").pvalue) if k else 1.0
        evidence = (f"McNemar p={p:.3g} ({paired.a_only} right only in baseline, {paired.b_only} only in "
                    f"candidate, n={paired.n})")
        failed = drop > threshold_pp + _EPS and p < alpha
        if drop > threshold_pp + _EPS and not failed:
            evidence += f": not significant at {alpha:g}"
    elif baseline.n_questions == candidate.n_questions:
        drop = a - b
        evidence = f"accuracy only (no per-question results on both sides), n={baseline.n_questions}"
        failed = drop > threshold_pp + _EPS
    else:
        return Check(case, "accuracy", field_name, SKIP, a, b, "%", math.nan, threshold,
                     f"{baseline.n_questions} vs {candidate.n_questions} questions, no per-question results",
                     f"{case}: {field_name} not compared: scored on {candidate.n_questions} vs "
                     f"{baseline.n_questions} questions without per-question results to pair")
    message = (f"{case}: {field_name} {-drop:+.1f} pp vs baseline (threshold {threshold}), {evidence}; "
               f"{'regressed' if failed else 'holds'} ({b:.1f}% vs {a:.1f}%)")
    return Check(case, "accuracy", field_name, FAIL if failed else PASS, a, b, "%", -drop, threshold, evidence,
                 message)


def _workload_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [f"{k} {b[k]!r} vs {a[k]!r}" for k in a if k in b and a[k] != b[k]]


def hardware(summary: RunSummary) -> str:
    """The machine a case's speed and memory belong to: GPU name, or CPU model with its thread count."""
    threads = summary.fingerprint.get("cpu_cores_logical")
    if summary.device.startswith("CPU") and threads:
        return f"{summary.device} ({threads} threads)"
    return summary.device


def machine_drift(baseline: RunSummary, candidate: RunSummary) -> dict[str, float]:
    """How the machine each run measured differs: percent change of every ceiling both measured.

    Args:
        baseline: the baseline's summary (a bench file keeps its ceilings in ``fingerprint["hardware"]``).
        candidate: the candidate's.

    Returns:
        Ceiling key (``MACHINE``) -> candidate vs baseline in percent; empty where a side measured none.
    """
    a, b = (s.fingerprint.get("hardware") or {} for s in (baseline, candidate))
    return {key: 100 * (b[key] / a[key] - 1) for key in MACHINE
            if isinstance(a.get(key), int | float) and isinstance(b.get(key), int | float) and a[key] > 0}


def machine_text(drift: Mapping[str, float]) -> str:
    """E.g. "matmul FLOP/s -6.0%, copy bandwidth -4.0%"."""
    return ", ".join(f"{MACHINE[k]} {v:+.1f}%" for k, v in drift.items())


def machine_state(baseline: RunSummary, candidate: RunSummary, limit_pct: float | None) -> tuple[bool, str]:
    """Whether speed may be compared on the machines the runs measured, and what was found.

    Not where every ceiling both measured moved by more than ``limit_pct``: the whole machine was
    busier, slower or faster. One ceiling moving alone is its probe's noise, and speed is compared.

    Args:
        baseline: the baseline's summary.
        candidate: the candidate's.
        limit_pct: ``Thresholds.machine_pct``; None: not checked.

    Returns:
        (comparable, text for the evidence; empty when not checked).
    """
    if limit_pct is None:
        return True, ""
    drift = machine_drift(baseline, candidate)
    if not drift:
        return True, "machine not measured on both sides, not checked"
    within = [MACHINE[k] for k, v in drift.items() if abs(v) <= limit_pct + _EPS]
    if not within:
        return False, f"machine measured {machine_text(drift)} vs the baseline's, each beyond {limit_pct:g}%"
    if len(within) == len(drift):
        return True, f"machine within {limit_pct:g}% ({machine_text(drift)})"
    return True, f"machine within {limit_pct:g}% on {' and '.join(within)} ({machine_text(drift)})"


def compare_case(baseline: GateCase, candidate: GateCase, thresholds: Thresholds) -> tuple[list[Check], list[str]]:
    """Every check of one matched case, and notes.

    Args:
        baseline: the baseline's case.
        candidate: the candidate's case of the same name.
        thresholds: what is allowed.

    Returns:
        (checks, notes).

    Raises:
        GateError: different models (name, shape or preset seed).
    """
    a, b, name = baseline.summary, candidate.summary, candidate.name
    try:
        check_comparable(a, b)
    except ReportError as e:
        raise GateError(f"{name}: {e}") from e
    checks: list[Check] = []
    notes: list[str] = []
    if candidate.oom and not baseline.oom and thresholds.gated("memory"):
        checks.append(Check(name, "memory", "out of memory", FAIL, math.nan, math.nan, "", math.nan, "none",
                            candidate.oom, f"{name}: the candidate ran out of memory ({candidate.oom}); the baseline "
                            "did not"))
    differs = _workload_differences(baseline.workload, candidate.workload)
    if hardware(a) != hardware(b):  # another machine's speed is not a regression
        differs.insert(0, f"hardware {hardware(b)!r} vs {hardware(a)!r}")
    # Nor is the same machine busier or slower, as the runs measured it (memory does not depend on it).
    same_machine, machine = machine_state(a, b, thresholds.machine_pct)
    for metric in (*SPEED, *MEMORY):
        kind = "speed" if metric in SPEED else "memory"
        ma, mb = a.metrics.get(metric), b.metrics.get(metric)
        if ma is None or mb is None or not thresholds.gated(kind, metric):
            continue
        if differs:
            checks.append(Check(name, kind, metric, SKIP, ma.value, mb.value, _UNITS.get(metric, ""), math.nan,
                                "-", "different workload: " + ", ".join(differs),
                                f"{name}: {_LABELS.get(metric, metric)} not compared: other work or hardware "
                                f"({', '.join(differs)})"))
        elif kind == "speed" and not same_machine:
            checks.append(Check(name, kind, metric, SKIP, ma.value, mb.value, _UNITS.get(metric, ""), math.nan,
                                f"-{thresholds.pct(metric):g}%", machine,
                                f"{name}: {_LABELS.get(metric, metric)} not compared: {machine}"))
        elif kind == "speed":
            checks.append(speed_check(name, metric, ma.value, mb.value, baseline.rounds.get(metric, ()),
                                      candidate.rounds.get(metric, ()), thresholds.pct(metric), thresholds.alpha,
                                      baseline.timings.get(metric), candidate.timings.get(metric), machine))
        else:
            checks.append(memory_check(name, metric, ma.value, mb.value, thresholds.pct(metric)))
    paired_a, paired_b = dict(a.phases), dict(b.phases)
    for phase in a.phases.keys() & b.phases.keys():
        pa, pb = a.phases[phase], b.phases[phase]
        if pa.questions and pb.questions:
            pa, pb = paired_a[phase], paired_b[phase] = common_questions(pa, pb)
            if not pa.questions:
                notes.append(f"{name}: {phase} scores share no question; accuracy not compared")
                del paired_a[phase], paired_b[phase]
                continue
            if pa.n_questions != a.phases[phase].n_questions or pb.n_questions != b.phases[phase].n_questions:
                notes.append(f"{name}: {phase} compared on the {pa.n_questions} questions both scored "
                             f"(baseline {a.phases[phase].n_questions}, candidate {b.phases[phase].n_questions})")
        if thresholds.gated("accuracy"):
            checks.append(accuracy_check(name, phase, pa, pb, thresholds.accuracy_pp, thresholds.alpha))
    if thresholds.gated("parity"):
        parity_checks, parity_notes = _parity(name, replace(a, label="baseline", phases=paired_a),
                                              replace(b, label="candidate", phases=paired_b), thresholds)
        checks += parity_checks
        notes += parity_notes
    return checks, notes


def _parity(name: str, a: RunSummary, b: RunSummary, thresholds: Thresholds) -> tuple[list[Check], list[str]]:
    """The parity verdict's points (the report's compare_runs + judge_pair) as checks; flags become notes."""
    tol = thresholds.tolerances
    try:
        pair = compare_runs(a, b, tol)
    except ReportError as e:
        raise GateError(f"{name}: {e}") from e
    findings = judge_pair(pair, tol)
    # judge_pair's order: per phase the accuracy point, then (same weights) the numerics point; then the loss point.
    points: list[tuple[str, str, float, float, str]] = []  # field, threshold, baseline, candidate, evidence
    for ph in pair.phases:
        acc, lp = ph.accuracy, ph.logprobs
        points.append((f"accuracy equivalence (TOST, {ph.phase})", f"+-{tol.margin_pp:g} pp", 100 * acc.accuracy_a,
                       100 * acc.accuracy_b, f"diff {100 * acc.diff:+.2f} pp, 90% CI {100 * acc.ci90[0]:+.2f} to "
                       f"{100 * acc.ci90[1]:+.2f}, TOST p={acc.tost_p:.3g}, n={acc.n}"))
        if ph.same_weights:
            points.append((f"log-probabilities (KL, {ph.phase})", f"<= {tol.kl_nats:g} nats", math.nan, math.nan,
                           f"mean KL {lp.kl_mean:.2e} nats (max {lp.kl_max:.2e}), {lp.nonfinite} non-finite"))
    if pair.loss is not None:
        points.append(("loss curve finite", "no NaN/inf", math.nan, math.nan,
                       f"NaN/inf on {pair.loss.nonfinite_b} steps (baseline {pair.loss.nonfinite_a}) of "
                       f"{pair.loss.steps_compared}"))
    judged = [f for f in findings if f.status != FLAG]
    assert len(judged) == len(points), "judge_pair's points changed: update gate._parity"
    checks = [Check(name, "parity", point, FAIL if f.status == FAIL else PASS, a_value, b_value,
                    "%" if math.isfinite(a_value) else "", math.nan, threshold, evidence,
                    f"{name}: parity {point} (threshold {threshold}): {f.text}")
              for (point, threshold, a_value, b_value, evidence), f in zip(points, judged, strict=True)]
    return checks, [f"{name}: {f.text}" for f in findings if f.status == FLAG]


def gate_cases(baseline: Sequence[GateCase], candidate: Sequence[GateCase], thresholds: Thresholds,
               baseline_path: str = "baseline", candidate_path: str = "candidate") -> GateResult:
    """Match cases by name and check each pair: what ``medqa-parity gate`` decides.

    Args:
        baseline: the baseline's cases.
        candidate: the candidate's cases.
        thresholds: what is allowed.
        baseline_path: named in the result.
        candidate_path: named in the result.

    Returns:
        The result; ``exit_code`` 1 when any check failed.

    Raises:
        GateError: a run record against a benchmark file, no case in common, different models,
            or nothing both sides measured.
    """
    sources = {c.summary.source for c in baseline}, {c.summary.source for c in candidate}
    if sources[0] != sources[1]:
        raise GateError(f"{candidate_path} ({'/'.join(sorted(sources[1]))}) vs {baseline_path} "
                        f"({'/'.join(sorted(sources[0]))}): gate a run record against a run record and a "
                        "pytest-benchmark file against a pytest-benchmark file")
    by_name = {c.name: c for c in candidate}
    matched = [(a, by_name[a.name]) for a in baseline if a.name in by_name]
    if not matched:
        raise GateError(f"{candidate_path} vs {baseline_path}: no case in common (baseline: "
                        f"{', '.join(c.name for c in baseline) or 'none'}; candidate: "
                        f"{', '.join(c.name for c in candidate) or 'none'})")
    checks: list[Check] = []
    notes: list[str] = []
    for a, b in matched:
        case_checks, case_notes = compare_case(a, b, thresholds)
        checks += case_checks
        notes += case_notes
    names = {c.name for c in baseline}
    only_base = [c.name for c in baseline if c.name not in by_name]
    only_cand = [c.name for c in candidate if c.name not in names]
    if only_base:
        notes.append(f"not in the candidate, not gated: {', '.join(only_base)}")
    if only_cand:
        notes.append(f"not in the baseline, not gated: {', '.join(only_cand)}")
    if not any(c.status != SKIP for c in checks):
        why = "; ".join(c.evidence for c in checks if c.status == SKIP) or "no metric measured on both sides"
        raise GateError(f"{candidate_path} vs {baseline_path}: nothing could be compared ({why})")
    return GateResult(baseline_path, candidate_path, thresholds, tuple(checks), tuple(notes))


def run_gate(baseline: str | Path, candidate: str | Path, thresholds: Thresholds) -> GateResult:
    """Read both files and gate the candidate.

    Args:
        baseline: run record or pytest-benchmark file.
        candidate: the same kind of file.
        thresholds: what is allowed.

    Returns:
        The result.

    Raises:
        GateError: unreadable input or runs that cannot be compared.
    """
    return gate_cases(load_cases(baseline), load_cases(candidate), thresholds, str(baseline), str(candidate))


# ---- output ------------------------------------------------------------------------------------


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
                     "check": f"parity: {c.field}" if c.kind == "parity" else _LABELS.get(c.field, c.field),
                     "baseline": _fmt(c.baseline, c.unit),
                     "candidate": _fmt(c.candidate, c.unit), "change": change, "threshold": c.threshold,
                     "evidence": c.evidence})
    return pd.DataFrame(rows, columns=["status", "case", "check", "baseline", "candidate", "change", "threshold",
                                       "evidence"])


def verdict_line(result: GateResult) -> str:
    """"gate: PASS ..." or "gate: FAIL, k of n checks regressed ...", one line."""
    gated = [c for c in result.checks if c.status != SKIP]
    if result.passed:
        return (f"gate: PASS: {result.candidate} holds against {result.baseline} "
                f"({len(gated)} checks, {len(result.checks) - len(gated)} not compared)")
    return (f"gate: FAIL: {len(result.failures)} of {len(gated)} checks regressed, {result.candidate} "
            f"against {result.baseline}")


def thresholds_text(t: Thresholds) -> str:
    """The thresholds in one line, as a reader needs them beside the table."""
    parts = [f"speed -{t.speed_pct:g}% (and Mann-Whitney p < {t.alpha:g} where rounds were kept)",
             f"memory +{t.memory_pct:g}%", f"accuracy -{t.accuracy_pp:g} pp (and McNemar p < {t.alpha:g} where paired)",
             f"parity margin +-{t.parity_margin_pp:g} pp, KL <= {t.kl_nats:g} nats"]
    parts += [f"{k} {'-' if k in SPEED else '+'}{v:g}%" for k, v in t.metric_pct]
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
    mark = "PASS" if result.passed else "FAIL"
    lines = [f"## medqa-parity gate: {mark}", "", f"Candidate `{result.candidate}` against baseline "
             f"`{result.baseline}`.", "", f"Thresholds: {thresholds_text(result.thresholds)}.", ""]
    if result.failures:
        lines += [f"- **{c.message}**" for c in result.failures] + [""]
    lines += [markdown_table(checks_table(result)), ""]
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
