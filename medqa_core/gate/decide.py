"""Regression gate: a candidate run against a baseline on speed, memory, accuracy and parity.

``medqa-parity gate --baseline RUN --candidate RUN`` reads both files with the report's readers
(:mod:`medqa_core.compare.inputs`, through :mod:`medqa_core.gate.cases`), matches their cases (a
pytest-benchmark file by case name: arm, kernel and parameters, e.g. ``test_train_ours[sdpa]``;
a run record with the other file's record) and checks every metric both sides measured against a
threshold (:mod:`medqa_core.gate.thresholds`):

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
- parity: the report's verdict (:func:`medqa_core.compare.parity.judge_pair`): TOST equivalence within
  ``parity_margin_pp``, KL within ``kl_nats`` where both scored the same weights, finite losses.

A case whose workload or settings differ (other batch, sequence length, question count, config,
compute dtype, quantization) or that ran on other hardware (GPU, or CPU model and thread count) is
listed as not compared for speed and memory, with the reason ("other CPU model"), rather than gated;
its accuracy and parity are still checked.

The gate judges or refuses, never waves through: a check whose figures are not finite or not complete on
both sides is inconclusive, naming the field and the file (NaN or inf in a round or step time or a stored
figure, fewer questions than the file says or than the baseline scored, a part of a record missing, a case
of the baseline missing in the candidate, the same file on both sides; under ``allow_missing`` a missing
figure is listed as not compared instead), and so is a change past twice its threshold that the test
cannot call (noisy rounds, a single timing). Any failure exits 1; else any inconclusive check, or most
checks not compared (unless ``allow_not_compared``), exits 4. Decisions are pure functions of the loaded
cases (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medqa_core.compare.inputs import BASE, FINE_TUNED, CompareError, RunSummary
from medqa_core.compare.metrics import MEMORY_KEYS as MEMORY
from medqa_core.compare.metrics import SPEED_KEYS as SPEED
from medqa_core.compare.metrics import label as metric_label
from medqa_core.compare.metrics import unit as metric_unit
from medqa_core.compare.pairs import check_comparable, compare_runs, settings_differences
from medqa_core.compare.parity import FAIL, judge_pair
from medqa_core.gate.cases import GateCase, load_cases
from medqa_core.gate.checks import (
    INCONCLUSIVE,
    SKIP,
    Check,
    accuracy_check,
    common_questions,
    invalid_check,
    memory_check,
    parity_checks,
    speed_check,
    unusable_check,
)
from medqa_core.gate.thresholds import GateError, Thresholds

EXIT_INCONCLUSIVE = 4
_EPS = 1e-9  # a change exactly at the threshold holds, whatever the float rounding
# The machine's ceilings bench/ measures at the start of its session (fingerprint["hardware"]) -> label.
MACHINE = {"matmul_bf16_flops_per_s": "matmul FLOP/s", "copy_bandwidth_bytes_per_s": "copy bandwidth"}


@dataclass(frozen=True)
class GateResult:
    """Every check of a candidate against its baseline, and the verdict.

    Attributes:
        baseline, candidate: the files compared.
        thresholds: what was allowed.
        checks: in case order, then speed, memory, accuracy, parity.
        notes: cases on one side only, parity flags, subsets compared.
        allow_not_compared: a gate where most checks were not compared may pass (``--allow-not-compared``).
    """

    baseline: str
    candidate: str
    thresholds: Thresholds
    checks: tuple[Check, ...]
    notes: tuple[str, ...] = ()
    allow_not_compared: bool = False

    @property
    def failures(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.failed)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def not_compared(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status == SKIP)

    @property
    def unjudged(self) -> tuple[Check, ...]:
        """Checks that cannot be judged: a figure not finite or incomplete, or a change too noisy to call."""
        return tuple(c for c in self.checks if c.inconclusive)

    @property
    def mostly_not_compared(self) -> bool:
        """Most checks were not compared: a pass would say little (unless ``allow_not_compared``)."""
        return len(self.not_compared) > len(self.checks) - len(self.not_compared) and not self.allow_not_compared

    @property
    def inconclusive(self) -> bool:
        """Neither a pass nor a failure: a check could not be judged, or most were not compared."""
        return self.passed and (bool(self.unjudged) or self.mostly_not_compared)

    @property
    def exit_code(self) -> int:
        """0 when the candidate holds, 1 when something regressed, 4 when a check could not be judged or most
        were not compared."""
        if not self.passed:
            return 1
        return EXIT_INCONCLUSIVE if self.inconclusive else 0



def _workload_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [f"{k} {a[k]!r} vs {b[k]!r}" for k in a if k in b and a[k] != b[k]]



def hardware_difference(a: RunSummary, b: RunSummary) -> str | None:
    """Why two runs' speed and memory belong to other machines, in a few words, or None (the same hardware).

    Args:
        a: the baseline's summary.
        b: the candidate's.

    Returns:
        "other GPU", "other CPU model", "other thread count", "other CPU features" (the same model name and
        threads, other instruction sets: a Xeon with AMX and one without), "other device" (CPU against GPU), or
        None.
    """
    if hardware(a, cpu_features(b)) == hardware(b, cpu_features(a)):
        return None
    cpu_a, cpu_b = a.device.startswith("CPU"), b.device.startswith("CPU")
    if cpu_a != cpu_b:
        return "other device"
    if not cpu_a:
        return "other GPU"
    if a.device != b.device:
        return "other CPU model"
    if hardware(a, None) != hardware(b, None):
        return "other thread count"
    return "other CPU features"


def cpu_features(summary: RunSummary) -> tuple[str, ...] | None:
    """The instruction sets a CPU run's fingerprint lists (``cpu_flags``: those torch's kernels choose by, e.g.
    avx512_bf16, amx_bf16), sorted; None where the file recorded none."""
    flags = summary.fingerprint.get("cpu_flags")
    return tuple(sorted(flags)) if isinstance(flags, list) and flags else None


def hardware(summary: RunSummary, other_features: tuple[str, ...] | None) -> str:
    """The machine a case's speed and memory belong to: GPU name, or CPU model with its thread count and, where
    both runs recorded them (``other_features``: the other run's :func:`cpu_features`; None: leave them out),
    its instruction sets. One model name covers several processors: an "Intel(R) Xeon(R) Processor" with AMX
    multiplied bf16 13x faster than the CI baseline's without, and the same code's CI bench peaked at 1.39-1.46
    GiB host RSS there against the baseline's 1.18 (session 51)."""
    threads = summary.fingerprint.get("cpu_cores_logical")
    if summary.device.startswith("CPU") and threads:
        features = cpu_features(summary)
        listed = f", {' '.join(features)}" if features and other_features is not None else ""
        return f"{summary.device} ({threads} threads{listed})"
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



def _invalid_figures(a: RunSummary, b: RunSummary) -> dict[str, list[str]]:
    """Metric or phase -> what is wrong with it on either side (not finite, incomplete), for the figures measured."""
    invalid: dict[str, list[str]] = {}
    measured = {*a.metrics, *b.metrics, *a.phases, *b.phases}
    for side, f in [("baseline", f) for f in a.invalid] + [("candidate", f) for f in b.invalid]:
        # Damage counts for the figures a side has (a record without train has no train rates, the other does).
        keys = [k for k in f.checks if k in measured] or list(f.checks[:1])
        for key in keys:
            invalid.setdefault(key, []).append(f"{side} {f.text}")
    return invalid


def _invalid_checks(name: str, invalid: Mapping[str, list[str]], thresholds: Thresholds) -> list[Check]:
    """One inconclusive check per gated figure of :func:`_invalid_figures`."""
    checks: list[Check] = []
    for key, texts in invalid.items():
        if key in (BASE, FINE_TUNED):
            if thresholds.gated("accuracy"):
                checks.append(invalid_check(name, "accuracy", f"accuracy ({key})", texts))
        elif thresholds.gated("speed" if key in SPEED else "memory", key):
            checks.append(invalid_check(name, "speed" if key in SPEED else "memory", key, texts))
    return checks


def _metric_checks(baseline: GateCase, candidate: GateCase, thresholds: Thresholds, invalid: Mapping[str, Any],
                   differs: Sequence[str], reason: str, same_machine: bool, machine: str) -> list[Check]:
    """The speed and memory checks of one case: not compared where ``differs`` (other work, settings or hardware)
    or, for speed, where the machine moved; unusable where a side lacks the figure; else judged."""
    a, b, name = baseline.summary, candidate.summary, candidate.name
    checks: list[Check] = []
    for metric in (*SPEED, *MEMORY):
        kind = "speed" if metric in SPEED else "memory"
        ma, mb = a.metrics.get(metric), b.metrics.get(metric)
        if (ma is None and mb is None) or not thresholds.gated(kind, metric) or metric in invalid:
            continue
        va, vb = (None if m is None else m.value for m in (ma, mb))
        unit, label = metric_unit(metric), metric_label(metric)
        if differs:
            checks.append(Check(case=name, kind=kind, field=metric, status=SKIP, baseline=_nan(va),
                                candidate=_nan(vb), unit=unit, change=math.nan, threshold="-",
                                evidence="different workload (baseline vs candidate): " + ", ".join(differs),
                                message=f"{name}: {label} not compared: other work or hardware ({', '.join(differs)})",
                                reason=reason))
        elif va is None:
            checks.append(Check(case=name, kind=kind, field=metric, status=SKIP, baseline=math.nan,
                                candidate=_nan(vb), unit=unit, change=math.nan, threshold="-",
                                evidence="not measured in the baseline",
                                message=f"{name}: {label} not compared: the baseline did not "
                                        "measure it",
                                reason="not in the baseline"))
        elif vb is None and candidate.oom:
            continue  # the out-of-memory check speaks for it
        elif vb is None or not (math.isfinite(va) and math.isfinite(vb) and va > 0):
            threshold = f"{'-' if kind == 'speed' else '+'}{thresholds.pct(metric):g}%"
            checks.append(unusable_check(name, kind, metric, va, vb, threshold,
                                         allowed=thresholds.missing_ok(kind, metric), paths=(a.path, b.path)))
        elif kind == "speed" and not same_machine:
            checks.append(Check(case=name, kind=kind, field=metric, status=SKIP, baseline=va, candidate=vb, unit=unit,
                                change=math.nan, threshold=f"-{thresholds.pct(metric):g}%", evidence=machine,
                                message=f"{name}: {label} not compared: {machine}", reason="machine moved"))
        elif kind == "speed":
            checks.append(speed_check(name, metric, va, vb, baseline.rounds.get(metric, ()),
                                      candidate.rounds.get(metric, ()), thresholds.pct(metric), thresholds.alpha,
                                      baseline.timings.get(metric), candidate.timings.get(metric), machine))
        else:
            checks.append(memory_check(name, metric, va, vb, thresholds.pct(metric)))
    return checks


def _accuracy_checks(baseline: GateCase, candidate: GateCase, thresholds: Thresholds, invalid: Mapping[str, Any]
                     ) -> tuple[list[Check], list[str], dict[str, Any], dict[str, Any]]:
    """The accuracy checks of one case, per phase both scored, on the questions both scored.

    Returns:
        (checks, notes, the baseline's and the candidate's phases to judge parity on: those without an invalid
        figure, cut to the questions both scored).
    """
    a, b, name = baseline.summary, candidate.summary, candidate.name
    checks: list[Check] = []
    notes: list[str] = []
    paired_a = {p: s for p, s in a.phases.items() if p not in invalid}
    paired_b = {p: s for p, s in b.phases.items() if p not in invalid}
    for phase in [p for p in paired_a if p in paired_b]:  # in the baseline's order, every run the same
        pa, pb = a.phases[phase], b.phases[phase]
        if pa.questions and pb.questions:
            pa, pb = paired_a[phase], paired_b[phase] = common_questions(pa, pb)
            if pa.n_questions < a.phases[phase].n_questions:  # the candidate left out questions the baseline scored
                why = (f"the candidate ({b.path}) scored {pa.n_questions} of the {a.phases[phase].n_questions} "
                       f"questions the baseline ({a.path}) scored")
                checks.append(invalid_check(name, "accuracy", f"accuracy ({phase})", [why]))
                del paired_a[phase], paired_b[phase]
                continue
            if pb.n_questions != b.phases[phase].n_questions:
                notes.append(f"{name}: {phase} compared on the {pa.n_questions} questions both scored "
                             f"(baseline {a.phases[phase].n_questions}, candidate {b.phases[phase].n_questions})")
        if thresholds.gated("accuracy"):
            checks.append(accuracy_check(name, phase, pa, pb, thresholds.accuracy_pp, thresholds.alpha))
    for phase in [p for p in paired_a if p not in b.phases]:
        if thresholds.gated("accuracy") and not candidate.oom:
            checks.append(unusable_check(name, "accuracy", f"accuracy ({phase})", 100 * a.phases[phase].accuracy,
                                         None, f"-{thresholds.accuracy_pp:g} pp", unit="%", paths=(a.path, b.path)))
    for phase in [p for p in paired_b if p not in a.phases]:
        if thresholds.gated("accuracy"):
            checks.append(unusable_check(name, "accuracy", f"accuracy ({phase})", None,
                                         100 * b.phases[phase].accuracy, f"-{thresholds.accuracy_pp:g} pp", unit="%",
                                         paths=(a.path, b.path)))
    return checks, notes, paired_a, paired_b


def compare_case(baseline: GateCase, candidate: GateCase, thresholds: Thresholds) -> tuple[list[Check], list[str]]:
    """Every check of one matched case, and notes.

    Speed and memory are not compared (each listed, with the reason) where the runs did other work, ran
    other settings (compute dtype, eval packing, quantization) or ran on other hardware; speed also where
    the whole machine measured slower or faster. A figure one side lacks or that is not finite fails
    (or, with ``allow_missing``, is listed as not compared); one only the candidate has is listed.

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
    except CompareError as e:
        raise GateError(f"{name}: {e}") from e
    checks: list[Check] = []
    notes: list[str] = []
    # Figures not finite or incomplete on either side: their checks cannot be judged, and are not run.
    invalid = _invalid_figures(a, b)
    checks += _invalid_checks(name, invalid, thresholds)
    if candidate.oom and not baseline.oom and thresholds.gated("memory"):
        checks.append(Check(case=name, kind="memory", field="out of memory", status=FAIL, baseline=math.nan,
                            candidate=math.nan, unit="", change=math.nan, threshold="none", evidence=candidate.oom,
                            message=f"{name}: the candidate ran {candidate.oom}; the baseline did not"))
    differs = _workload_differences(baseline.workload, candidate.workload)
    settings = settings_differences(a, b)
    if settings:
        notes.append(f"{name}: settings differ ({'; '.join(settings)}): speed and memory not compared")
        differs += [s for s in settings if not any(s.startswith(k) for k in ("compute dtype",))]
    other_machine = hardware_difference(a, b)
    if other_machine:  # another machine's speed is not a regression
        differs.insert(0, f"hardware {hardware(a, cpu_features(b))!r} vs {hardware(b, cpu_features(a))!r}")
    reason = other_machine or ("other settings" if settings else "other workload")
    # Nor is the same machine busier or slower, as the runs measured it (memory does not depend on it).
    same_machine, machine = machine_state(a, b, thresholds.machine_pct)
    checks += _metric_checks(baseline, candidate, thresholds, invalid, differs, reason, same_machine, machine)
    # A phase with an invalid figure is judged neither on accuracy nor on parity: its check says why.
    accuracy, accuracy_notes, paired_a, paired_b = _accuracy_checks(baseline, candidate, thresholds, invalid)
    checks += accuracy
    notes += accuracy_notes
    if thresholds.gated("parity"):
        tol = thresholds.tolerances
        try:
            pair = compare_runs(replace(a, label="baseline", phases=paired_a),
                                replace(b, label="candidate", phases=paired_b), tol)
        except CompareError as e:
            raise GateError(f"{name}: {e}") from e
        parity, flags = parity_checks(name, judge_pair(pair, tol))
        checks += parity
        notes += [f for f in flags if "settings differ" not in f]  # settings are noted above, once
    return checks, notes


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def gate_cases(baseline: Sequence[GateCase], candidate: Sequence[GateCase], thresholds: Thresholds,
               baseline_path: str = "baseline", candidate_path: str = "candidate",
               allow_not_compared: bool = False) -> GateResult:
    """Match cases by name and check each pair: what ``medqa-parity gate`` decides.

    Args:
        baseline: the baseline's cases.
        candidate: the candidate's cases.
        thresholds: what is allowed.
        baseline_path: named in the result.
        candidate_path: named in the result.
        allow_not_compared: let a gate where most checks were not compared pass (exit 0, not 4).

    Returns:
        The result; ``exit_code`` 1 when any check failed, 4 when most were not compared.

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
    for case in only_base:  # a case that vanished is not a case that holds
        why = f"in the baseline ({baseline_path}), missing in the candidate ({candidate_path})"
        checks.append(Check(case=case, kind="case", field="case", status=INCONCLUSIVE, baseline=math.nan,
                            candidate=math.nan, unit="", change=math.nan, threshold="-", evidence=why,
                            message=f"{case}: cannot be judged: {why}", reason="case missing"))
    if only_cand:
        notes.append(f"not in the baseline, not gated: {', '.join(only_cand)}")
    if not any(c.status != SKIP for c in checks):
        why = "; ".join(c.evidence for c in checks if c.status == SKIP) or "no metric measured on both sides"
        raise GateError(f"{candidate_path} vs {baseline_path}: nothing could be compared ({why})")
    return GateResult(baseline_path, candidate_path, thresholds, tuple(checks), tuple(notes), allow_not_compared)



def run_gate(baseline: str | Path, candidate: str | Path, thresholds: Thresholds,
             allow_not_compared: bool = False) -> GateResult:
    """Read both files and gate the candidate.

    Args:
        baseline: run record or pytest-benchmark file.
        candidate: the same kind of file.
        thresholds: what is allowed.
        allow_not_compared: see :func:`gate_cases`.

    Returns:
        The result; inconclusive with one check when both name the same file (or two copies of one), which
        holds against itself whatever it contains.

    Raises:
        GateError: unreadable input or runs that cannot be compared.
    """
    cases_a, cases_b = load_cases(baseline), load_cases(candidate)
    if same_file(baseline, candidate):
        why = f"the candidate ({candidate}) is the baseline ({baseline}) itself, or a copy of it"
        check = Check(case="files", kind="case", field="candidate", status=INCONCLUSIVE, baseline=math.nan,
                      candidate=math.nan, unit="", change=math.nan, threshold="-", evidence=why,
                      message=f"cannot be judged: {why}; a file gated against itself holds whatever it holds; give the "
                              "candidate run's own file",
                      reason="same file")
        return GateResult(str(baseline), str(candidate), thresholds, (check,), (), allow_not_compared)
    return gate_cases(cases_a, cases_b, thresholds, str(baseline), str(candidate), allow_not_compared)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file, or two files of the same bytes (a copy: no rerun writes the same bytes,
    its times and timestamps differ)."""
    a, b = Path(a), Path(b)
    return a.resolve() == b.resolve() or a.read_bytes() == b.read_bytes()


