"""The gate against a baseline run set: accuracy and eval loss judged by the set's own spread, not a fixed threshold.

``medqa-parity gate --baseline-runset RUNSET --candidate RUN``: a fixed ``accuracy_pp`` says nothing about how far
one machine moves against itself. Here the threshold is the one-sided 1 - alpha prediction bound of one more run
of the baseline set (:func:`medqa_core.compare.runsets.prediction_bound`): a fresh run of the baseline's own machine
falls past it with probability alpha. The candidate fails when its fine-tuned accuracy is below the bound or its
eval loss (answer tokens) above it; with fewer than 3 seed runs in the set the check is inconclusive.

Pure functions of records (no torch).
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from medqa_core.compare.inputs import FINE_TUNED
from medqa_core.compare.parity import FAIL
from medqa_core.compare.runsets import MIN_RUNS, SetSummary, answer_loss_nats, prediction_bound, summarize_loaded
from medqa_core.gate.checks import INCONCLUSIVE, PASS, Check
from medqa_core.gate.decide import GateResult
from medqa_core.results.record import RunRecord, load_record
from medqa_core.results.runset import load_runset

FIELD_ACCURACY = f"accuracy ({FINE_TUNED})"
FIELD_LOSS = f"eval loss ({FINE_TUNED})"


def baseline_record(runset_path: str | Path) -> Path:
    """The set's first seed run: the record the rest of the gate (speed, memory, parity) compares with."""
    _, runs = load_runset(runset_path)
    return next(r.path for r in runs if r.entry.role == "seed")


def spread_checks(summary: SetSummary, candidate: RunRecord, alpha: float, where: str = "run") -> list[Check]:
    """The candidate's fine-tuned accuracy and eval loss against the set's prediction bounds.

    Args:
        summary: the baseline set's summary.
        candidate: the candidate's record.
        alpha: the share of the baseline machine's own runs that would fail.
        where: the case name in the checks.

    Returns:
        Two checks (accuracy in %, eval loss in nats).
    """
    after = candidate.eval_after
    acc = 100 * after.accuracy if after else math.nan
    loss = answer_loss_nats(after.questions) if after else math.nan
    checks = []
    for field, spread, value, unit, higher in ((FIELD_ACCURACY, summary.accuracy, acc, "%", True),
                                               (FIELD_LOSS, summary.eval_loss_nats, loss, "nats", False)):
        scale = 100 if unit == "%" else 1
        mean, sd = scale * spread.mean, scale * spread.sd
        bound = scale * prediction_bound(spread, alpha, higher_is_better=higher)
        sign = "-" if higher else "+"
        threshold = f"{sign}{abs(bound - mean):.3g} {unit if unit != '%' else 'pp'} (run-set spread)" \
            if math.isfinite(bound) else "run-set spread"
        evidence = (f"one-sided {100 * (1 - alpha):g}% prediction bound of one more run: {spread.n} seed runs, mean "
                    f"{mean:.4g}, sd {sd:.3g} {unit} -> {bound:.4g}")
        if spread.n < MIN_RUNS or not math.isfinite(value):
            why = (f"the baseline set has {spread.n} seed runs; its spread needs {MIN_RUNS} or more"
                   if spread.n < MIN_RUNS else "the candidate has no fine-tuned scores")
            checks.append(Check(case=where, kind="accuracy", field=field, status=INCONCLUSIVE, baseline=mean,
                                candidate=value, unit=unit, change=math.nan, threshold=threshold, evidence=why,
                                message=f"{where}: {field} cannot be judged: {why}", reason="too few runs"))
            continue
        worse = value < bound if higher else value > bound
        status = FAIL if worse else PASS
        verb = "below" if higher else "above"
        message = (f"{where}: {field} {value:.4g} {unit} is {verb} the baseline set's bound {bound:.4g}"
                   if worse else f"{where}: {field} {value:.4g} {unit} within the baseline set's spread")
        checks.append(Check(case=where, kind="accuracy", field=field, status=status, baseline=mean, candidate=value,
                            unit=unit, change=value - mean, threshold=threshold, evidence=evidence, message=message))
    return checks


def with_runset(result: GateResult, runset_path: str | Path, candidate_path: str | Path) -> GateResult:
    """``result`` with its fixed-threshold fine-tuned accuracy check replaced by the run set's spread checks."""
    _, runs = load_runset(runset_path)
    summary = summarize_loaded(runs, math.inf, str(runset_path))
    kept = tuple(c for c in result.checks if not (c.kind == "accuracy" and c.field == FIELD_ACCURACY))
    extra = spread_checks(summary, load_record(candidate_path), result.thresholds.alpha)
    note = (f"accuracy and eval loss judged against the baseline run set {runset_path} "
            f"({summary.accuracy.n} seed runs), not accuracy_pp")
    return replace(result, checks=kept + tuple(extra), notes=(*result.notes, note))
