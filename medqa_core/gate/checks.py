"""The gate's checks, one metric of one case each: speed, memory, accuracy, parity, and unusable figures.

Pure functions of figures (no torch, no files). Each returns a :class:`Check` whose message names the
case, the figure, the change and the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from medqa_core.compare.inputs import PhaseScores
from medqa_core.compare.metrics import label as metric_label
from medqa_core.compare.metrics import unit as metric_unit
from medqa_core.compare.parity import (
    FAIL,
    FLAG,
    Finding,
    ParityError,
    accuracy_parity,
    pair_questions,
)
from medqa_core.compare.stats import format_p, mcnemar_exact_p, slower_p, smallest_slower_p

# And parity's FAIL ("fail"). INCONCLUSIVE: the figures cannot be judged (not finite, incomplete, or a change
# too large to pass on a test that cannot tell it from noise); the gate then neither passes nor fails (exit 4).
PASS, SKIP, INCONCLUSIVE = "pass", "not compared", "inconclusive"
_EPS = 1e-9  # a change exactly at the threshold holds, whatever the float rounding
# A change past this many times its threshold is never passed as noise: where the test cannot call it
# significant (noisy rounds, a single timing) the check is inconclusive. Between the threshold and this, the
# test decides (a slower median inside wide rounds passes).
FAR_PAST = 2.0


@dataclass(frozen=True, kw_only=True)
class Check:
    """One metric of one case, baseline against candidate; built by keyword (twelve fields, several alike).

    Attributes:
        case: the case ("test_train_ours[sdpa]", or "run" for a run record).
        kind: "speed", "memory", "accuracy" or "parity".
        field: what was compared (a metric key, "accuracy (base)", a parity point).
        status: "pass", "fail", "not compared", or "inconclusive" (cannot be judged: a figure not finite or
            incomplete, or a change far past the threshold that the test cannot call).
        baseline, candidate: the figures (NaN when not applicable), in ``unit``.
        unit: unit of the figures ("tokens/s", "GiB", "%", "").
        change: candidate vs baseline: percent for speed and memory, points for accuracy (NaN if none).
        threshold: the allowed change, signed in the bad direction ("-10%", "+10%", "-2 pp").
        evidence: the test behind the decision ("Mann-Whitney p=0.004, 5 vs 5 rounds", "median only: ...").
        message: one line naming the case, field, change and threshold.
        reason: why a check was not compared, in a few words ("other CPU model", "single timing"); "" otherwise.
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
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    @property
    def inconclusive(self) -> bool:
        return self.status == INCONCLUSIVE



def format_figure(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "-"
    if unit == "%":
        return f"{value:.1f}%"
    if unit in ("tokens/s", "questions/s") and abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}".strip()



def unusable_check(case: str, kind: str, metric: str, baseline: float | None, candidate: float | None,
                   threshold: str, unit: str | None = None, allowed: bool = False,
                   paths: tuple[str, str] = ("", "")) -> Check:
    """A figure missing or not finite (NaN, inf, or a baseline of 0): an inconclusive check naming the side
    and its file, or, where the thresholds allow it (``allow_missing``), one listed as not compared.

    Args:
        case: case name.
        kind: "speed", "memory" or "accuracy".
        metric: the figure's key.
        baseline: the baseline's figure, None where it has none.
        candidate: the candidate's figure, None where it has none.
        threshold: the threshold text, as the check would show it.
        unit: the figures' unit (default: the registry's).
        allowed: list as not compared instead of inconclusive.
        paths: the baseline's and the candidate's files, named beside each side.

    Returns:
        The check.
    """
    unit = metric_unit(metric) if unit is None else unit
    sides = []
    for side, value, path in (("baseline", baseline, paths[0]), ("candidate", candidate, paths[1])):
        where = f" ({path})" if path else ""
        if value is None:
            sides.append(f"the {side}{where} has no figure")
        elif not math.isfinite(value) or (side == "baseline" and value <= 0 and kind != "accuracy"):
            sides.append(f"the {side}'s figure is {value!r}{where}")
    why = " and ".join(sides) or "no usable figure"
    a, b = (math.nan if v is None else v for v in (baseline, candidate))
    status, verb = (SKIP, "not compared") if allowed else (INCONCLUSIVE, "cannot be judged")
    return Check(case=case, kind=kind, field=metric, status=status, baseline=a, candidate=b, unit=unit,
                 change=math.nan, threshold=threshold, evidence=why,
                 message=f"{case}: {metric_label(metric)} {verb}: {why}",
                 reason="missing figure" if allowed else "invalid figure")


def invalid_check(case: str, kind: str, name: str, texts: Sequence[str]) -> Check:
    """A check that cannot be judged because a figure behind it is not finite or incomplete, naming each.

    Args:
        case: case name.
        kind: "speed", "memory", "accuracy" or "case".
        name: the check's field (a metric key, "accuracy (fine-tuned)").
        texts: what is wrong, each naming file and field (:attr:`InvalidFigure.text`).

    Returns:
        The inconclusive check.
    """
    why = "; ".join(texts)
    return Check(case=case, kind=kind, field=name, status=INCONCLUSIVE, baseline=math.nan, candidate=math.nan,
                 unit=metric_unit(name), change=math.nan, threshold="-", evidence=why,
                 message=f"{case}: {metric_label(name)} cannot be judged: {why}", reason="invalid figure")


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
    label, unit = metric_label(metric), metric_unit(metric)
    threshold = f"-{threshold_pct:g}%"
    if not (math.isfinite(baseline) and baseline > 0 and math.isfinite(candidate)):
        return unusable_check(case, "speed", metric, baseline, candidate, threshold)
    if not all(map(math.isfinite, (*baseline_rounds, *candidate_rounds))):
        why = "a round time is not finite"
        return Check(case=case, kind="speed", field=metric, status=INCONCLUSIVE, baseline=baseline,
                     candidate=candidate, unit=unit, change=math.nan, threshold=threshold, evidence=why,
                     message=f"{case}: {label} cannot be judged: {why}", reason="invalid figure")
    change = 100 * (candidate / baseline - 1)
    beyond = change < -threshold_pct - _EPS
    far = change < -FAR_PAST * threshold_pct - _EPS
    figures = f"baseline {format_figure(baseline, unit)}, candidate {format_figure(candidate, unit)}"
    single = [side for side, n in (("baseline", baseline_timings), ("candidate", candidate_timings)) if n == 1]
    if single:
        why = f"a single timing in the {' and '.join(single)}: no spread to tell a slowdown from noise"
        if far:
            why = (f"{change:+.1f}% is past {FAR_PAST:g}x the threshold ({threshold}), but {why}; time it over "
                   "rounds (pytest bench/) to judge it")
            return Check(case=case, kind="speed", field=metric, status=INCONCLUSIVE, baseline=baseline,
                         candidate=candidate, unit=unit, change=change, threshold=threshold, evidence=why,
                         message=f"{case}: {label} cannot be judged: {why} ({figures})", reason="too noisy to call")
        return Check(case=case, kind="speed", field=metric, status=SKIP, baseline=baseline, candidate=candidate,
                     unit=unit, change=math.nan, threshold=threshold, evidence=why,
                     message=f"{case}: {label} not compared: {why}", reason="single timing")
    n_b, n_c = len(baseline_rounds), len(candidate_rounds)
    smallest_p = smallest_slower_p(n_b, n_c)
    noisy = False
    if smallest_p < alpha:
        p = slower_p(candidate_rounds, baseline_rounds)
        evidence = f"Mann-Whitney {format_p(p)} ({n_b} vs {n_c} rounds)"
        failed = beyond and p < alpha
        if beyond and not failed:
            evidence += f": not significant at {alpha:g}"
            noisy = far
    else:
        missing = " and ".join(side for side, n in (("baseline", n_b), ("candidate", n_c)) if n < 2)
        why = (f"no per-round times in the {missing} (a pytest-benchmark file keeps them with --benchmark-save-data)"
               if missing else f"{n_c} vs {n_b} rounds cannot reach p < {alpha:g} (smallest p {smallest_p:.3g})")
        evidence = f"median only, not tested for significance: {why}"
        failed = beyond
    if machine:
        evidence += f"; raw {unit}, {machine}"
    if noisy:
        evidence += f", yet {change:+.1f}% is past {FAR_PAST:g}x the threshold: too noisy to pass or fail"
    status, verb = (INCONCLUSIVE, "cannot be judged") if noisy else (FAIL, "regressed") if failed else (PASS, "holds")
    message = (f"{case}: {label} {change:+.1f}% vs baseline (threshold {threshold}), {evidence}; {verb} "
               f"({figures})")
    return Check(case=case, kind="speed", field=metric, status=status, baseline=baseline, candidate=candidate,
                 unit=unit, change=change, threshold=threshold, evidence=evidence, message=message,
                 reason="too noisy to call" if noisy else "")



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
    label = metric_label(metric)
    threshold = f"+{threshold_pct:g}%"
    if not (math.isfinite(baseline) and baseline > 0 and math.isfinite(candidate)):
        return unusable_check(case, "memory", metric, baseline, candidate, threshold)
    change = 100 * (candidate / baseline - 1)
    failed = change > threshold_pct + _EPS
    message = (f"{case}: {label} {change:+.1f}% vs baseline (threshold {threshold}); "
               f"{'regressed' if failed else 'holds'} (baseline {baseline:.3g} GiB, candidate {candidate:.3g} GiB)")
    return Check(case=case, kind="memory", field=metric, status=FAIL if failed else PASS, baseline=baseline,
                 candidate=candidate, unit="GiB", change=change, threshold=threshold, evidence="peak of the case",
                 message=message)



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
    if not (math.isfinite(a) and math.isfinite(b)):
        return unusable_check(case, "accuracy", field_name, a, b, threshold, unit="%")
    noisy = False
    if baseline.questions and candidate.questions:
        try:
            questions = pair_questions(baseline.questions, candidate.questions)
            paired = accuracy_parity(questions, alpha=alpha)
        except ParityError as e:
            return Check(case=case, kind="accuracy", field=field_name, status=SKIP, baseline=a, candidate=b, unit="%",
                         change=math.nan, threshold=threshold, evidence=str(e),
                         message=f"{case}: {field_name} not compared: {e}", reason="other questions")
        drop = -100 * paired.diff
        _, _, p = mcnemar_exact_p(questions.correct_a, questions.correct_b, alternative="greater")
        evidence = (f"McNemar {format_p(p)} ({paired.a_only} right only in baseline, {paired.b_only} only in "
                    f"candidate, n={paired.n})")
        failed = drop > threshold_pp + _EPS and p < alpha
        if drop > threshold_pp + _EPS and not failed:
            evidence += f": not significant at {alpha:g}"
            if drop > FAR_PAST * threshold_pp + _EPS:
                noisy = True
                evidence += f", yet {-drop:+.1f} pp is past {FAR_PAST:g}x the threshold: too few questions to call"
    elif baseline.n_questions == candidate.n_questions:
        drop = a - b
        without = " and ".join(side for side, s in (("baseline", baseline), ("candidate", candidate))
                               if not s.questions)
        evidence = f"accuracy only (no per-question results in the {without}), n={baseline.n_questions}"
        failed = drop > threshold_pp + _EPS
    else:
        return Check(case=case, kind="accuracy", field=field_name, status=SKIP, baseline=a, candidate=b, unit="%",
                     change=math.nan, threshold=threshold,
                     evidence=f"{baseline.n_questions} vs {candidate.n_questions} questions, no per-question results",
                     message=f"{case}: {field_name} not compared: scored on {candidate.n_questions} vs "
                             f"{baseline.n_questions} questions without per-question results to pair",
                     reason="other questions")
    status, verb = (INCONCLUSIVE, "cannot be judged") if noisy else (FAIL, "regressed") if failed else (PASS, "holds")
    message = (f"{case}: {field_name} {-drop:+.1f} pp vs baseline (threshold {threshold}), {evidence}; "
               f"{verb} (baseline {a:.1f}%, candidate {b:.1f}%)")
    return Check(case=case, kind="accuracy", field=field_name, status=status, baseline=a, candidate=b, unit="%",
                 change=-drop, threshold=threshold, evidence=evidence, message=message,
                 reason="too noisy to call" if noisy else "")



def parity_checks(case: str, findings: Sequence[Finding]) -> tuple[list[Check], list[str]]:
    """The parity verdict's judged points as checks; its flags (systematic shift, settings) as notes.

    Args:
        case: case name.
        findings: :func:`medqa_core.compare.parity.judge_pair` of the case's pair.

    Returns:
        (checks, notes).
    """
    checks = []
    for f in findings:
        if f.status == FLAG:
            continue
        where = f" ({f.phase})" if f.phase else ""
        name = {"accuracy": f"accuracy equivalence (TOST{', ' + f.phase if f.phase else ''})",
                "numerics": f"log-probabilities (KL{', ' + f.phase if f.phase else ''})",
                "loss": "loss curve finite"}.get(f.point, f"{f.point}{where}")
        checks.append(Check(case=case, kind="parity", field=name, status=FAIL if f.status == FAIL else PASS,
                            baseline=f.value_a, candidate=f.value_b, unit="%" if math.isfinite(f.value_a) else "",
                            change=math.nan, threshold=f.threshold, evidence=f.evidence,
                            message=f"{case}: parity {name} (threshold {f.threshold}): {f.text}"))
    return checks, [f"{case}: {f.text}" for f in findings if f.status == FLAG]
