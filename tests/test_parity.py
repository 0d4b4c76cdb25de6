"""Parity statistics on results whose answer is known (no torch, no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest, norm

from medqa_core.compare.pairs import quantization_differences, same_adapter
from medqa_core.compare.parity import (
    PairParity,
    ParityError,
    Tolerances,
    accuracy_parity,
    compare_phase,
    judge_pair,
    logprob_drift,
    loss_drift,
    pair_questions,
)
from medqa_core.compare.stats import mcnemar_exact_p, paired_bootstrap_ci
from medqa_core.results.record import QuestionResult

N_MEDQA_TEST = 1273  # questions in MedQA's 4-option US test split


def questions(correct: np.ndarray, seed: int = 0, prefix: str = "test.jsonl") -> tuple[QuestionResult, ...]:
    """Questions answered right where ``correct``; the prediction is the argmax of random log-probabilities."""
    rng = np.random.default_rng(seed)
    out = []
    for i, ok in enumerate(correct):
        answer = i % 4
        pred = answer if ok else (answer + 1 + i % 3) % 4
        lp = np.sort(rng.uniform(-12.0, -1.0, 4))[::-1]  # lp[0] is the largest
        logprobs = np.empty(4)
        logprobs[pred] = lp[0]
        logprobs[[k for k in range(4) if k != pred]] = lp[1:]
        out.append(QuestionResult(f"{prefix}:{i + 1}", answer, pred, tuple(float(x) for x in logprobs)))
    return tuple(out)


def from_counts(both: int, a_only: int, b_only: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Correctness arrays with the given 2x2 table of (A right, B right)."""
    ca = np.array([True] * both + [True] * a_only + [False] * b_only + [False] * neither, dtype=bool)
    cb = np.array([True] * both + [False] * a_only + [True] * b_only + [False] * neither, dtype=bool)
    return ca, cb


def test_identical_runs_are_at_parity():
    qs = questions(np.random.default_rng(1).random(N_MEDQA_TEST) < 0.3)
    acc = accuracy_parity(pair_questions(qs, qs))
    assert acc.diff == 0 and acc.ci95 == (0.0, 0.0) and acc.se == 0
    assert acc.agreement == 1.0 and acc.mcnemar_p == 1.0 and (acc.a_only, acc.b_only) == (0, 0)
    assert acc.equivalent and acc.tost_p == 0.0
    drift = logprob_drift(pair_questions(qs, qs))
    assert drift.max_abs == drift.mean_abs == drift.kl_max == 0.0 and drift.nonfinite == 0


def test_ten_point_shift_on_1273_questions_fails_equivalence():
    rng = np.random.default_rng(2)
    ca = rng.random(N_MEDQA_TEST) < 0.40
    cb = ca.copy()
    cb[np.flatnonzero(~ca)[:127]] = True  # 127 / 1273 = +9.98 points, all discordant pairs favour B
    acc = accuracy_parity(pair_questions(questions(ca), questions(cb, seed=3)))
    assert acc.diff == pytest.approx(127 / N_MEDQA_TEST)
    assert acc.ci95[0] < 127 / N_MEDQA_TEST < acc.ci95[1] and acc.ci95[0] > 0.05
    assert not acc.equivalent and acc.tost_p > 0.5
    assert acc.mcnemar_p == pytest.approx(binomtest(0, 127, 0.5).pvalue) and acc.mcnemar_p < 1e-30
    assert acc.agreement == pytest.approx(1 - 127 / N_MEDQA_TEST)


def test_one_point_shift_on_1273_questions_is_equivalent_at_three_points():
    ca, cb = from_counts(400, 50, 63, 760)  # +13 / 1273 = +1.0 point
    acc = accuracy_parity(pair_questions(questions(ca), questions(cb)))
    assert acc.equivalent and acc.tost_p < 0.05 and acc.ci90[0] > -0.03 and acc.ci90[1] < 0.03
    assert not accuracy_parity(pair_questions(questions(ca), questions(cb)), margin_pp=1.0).equivalent


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(0, 80), st.integers(0, 80), st.integers(0, 300))
def test_mcnemar_is_the_exact_binomial_test_on_discordant_pairs(both, a_only, b_only, neither):
    ca, cb = from_counts(both, a_only, b_only, neither)
    got_a, got_b, p = mcnemar_exact_p(ca, cb)
    assert (got_a, got_b) == (a_only, b_only)
    expected = binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    assert p == pytest.approx(expected, rel=1e-12, abs=0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 300), st.integers(0, 80), st.integers(0, 80), st.integers(0, 300),
       st.floats(0.5, 10.0))
def test_tost_equivalence_is_the_90_percent_ci_inside_the_margin(both, a_only, b_only, neither, margin_pp):
    ca, cb = from_counts(both, a_only, b_only, neither)
    if ca.size < 2:
        return
    acc = accuracy_parity(pair_questions(questions(ca), questions(cb)), margin_pp=margin_pp)
    inside = -margin_pp / 100 < acc.ci90[0] and acc.ci90[1] < margin_pp / 100
    assert acc.equivalent == inside
    d = cb.astype(float) - ca.astype(float)
    assert acc.se == pytest.approx(d.std(ddof=1) / math.sqrt(d.size))
    if acc.se > 0:  # the larger of the two one-sided p-values, from the normal distribution
        lower = norm.sf((acc.diff + margin_pp / 100) / acc.se)
        upper = norm.cdf((acc.diff - margin_pp / 100) / acc.se)
        assert acc.tost_p == pytest.approx(max(lower, upper))


def test_paired_bootstrap_ci_covers_the_true_difference():
    # 100 seeded simulated pairs of runs on 400 questions; true difference +5 points
    # (probabilities: both right .45, only A .10, only B .15, neither .30). A 95% interval
    # should miss about 5 times; 10 misses would be far outside binomial(100, 0.05) noise.
    rng = np.random.default_rng(20240505)
    covered = 0
    for sim in range(100):
        counts = rng.multinomial(400, [0.45, 0.10, 0.15, 0.30])
        ca, cb = from_counts(*counts)
        low, high = paired_bootstrap_ci(ca, cb, n_resamples=2000, seed=sim)
        covered += low <= 0.05 <= high
    assert covered >= 90


def test_paired_bootstrap_ci_is_seeded_and_centred():
    ca, cb = from_counts(300, 40, 60, 200)
    assert paired_bootstrap_ci(ca, cb, seed=7) == paired_bootstrap_ci(ca, cb, seed=7)
    low, high = paired_bootstrap_ci(ca, cb)
    diff = 20 / 600
    assert low < diff < high
    se = math.sqrt((100 / 600 - diff**2) / 600)  # the paired difference's standard error
    assert high - low == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_different_question_sets_are_refused_naming_them():
    a = questions(np.ones(5, bool))
    b = a[:4] + (QuestionResult("dev.jsonl:9", 0, 0, (-1.0, -2.0, -3.0, -4.0)),)
    with pytest.raises(ParityError, match=r"different question sets: 5 vs 5 questions, 1 only in run A "
                                          r"\(test.jsonl:5\), 1 only in run B \(dev.jsonl:9\)"):
        pair_questions(a, b)


def test_another_right_answer_is_refused():
    a = questions(np.ones(3, bool))
    b = (*a[:2], QuestionResult(a[2].qid, (a[2].answer + 1) % 4, 0, a[2].logprobs))
    with pytest.raises(ParityError, match="question test.jsonl:3: answer 2 .* answer 3 .*different data"):
        pair_questions(a, b)


def test_duplicate_qid_is_refused():
    a = questions(np.ones(3, bool))
    with pytest.raises(ParityError, match="run B: question test.jsonl:1 appears twice"):
        pair_questions(a, (*a, a[0]))


def test_pairing_follows_qid_not_order():
    a = questions(np.array([True, False, True, False]))
    paired = pair_questions(a, tuple(reversed(a)))
    assert np.array_equal(paired.pred_a, paired.pred_b) and paired.qids == tuple(q.qid for q in a)


def test_logprob_drift_known_kl_and_constant_shift():
    uniform = (math.log(0.25),) * 4
    skewed = tuple(math.log(p) for p in (0.5, 0.25, 0.125, 0.125))
    a = (QuestionResult("q1", 0, 0, uniform),)
    b = (QuestionResult("q1", 0, 0, skewed),)
    drift = logprob_drift(pair_questions(a, b))
    assert drift.kl_mean == pytest.approx(0.25 * math.log(4) / 2)  # sum .25 * log(.25 / q_i) = log(2) / 4
    assert drift.max_abs == pytest.approx(math.log(2)) and drift.mean_abs == pytest.approx(
        (math.log(2) + 0 + math.log(2) + math.log(2)) / 4)
    shifted = (QuestionResult("q1", 0, 0, tuple(x - 0.3 for x in uniform)),)
    drift = logprob_drift(pair_questions(a, shifted))
    assert drift.kl_mean == pytest.approx(0.0, abs=1e-15) and drift.mean_abs == pytest.approx(0.3)


def test_logprob_drift_counts_nonfinite_questions():
    a = questions(np.ones(3, bool))
    b = (*a[:2], QuestionResult(a[2].qid, a[2].answer, a[2].pred, (math.nan, -1.0, -2.0, -3.0)))
    drift = logprob_drift(pair_questions(a, b))
    assert drift.nonfinite == 1 and drift.n == 2 and drift.max_abs == 0.0


def test_loss_drift_over_common_steps():
    drift = loss_drift([2.0, 1.5, 1.2], [2.0, 1.8, 1.1, 1.0])
    assert (drift.steps_a, drift.steps_b, drift.steps_compared) == (3, 4, 3)
    assert drift.max_abs == pytest.approx(0.3) and drift.max_at_step == 2
    assert drift.mean_abs == pytest.approx(0.4 / 3)
    nan = loss_drift([2.0, 1.5, 1.2], [2.0, math.nan, 1.2])
    assert nan.nonfinite_b == 1 and nan.max_abs == 0.0
    with pytest.raises(ParityError, match="empty"):
        loss_drift([], [1.0])


def test_quantization_differences_name_the_setting():
    cuda = {"method": "bnb-nf4", "quant_type": "nf4", "blocksize": 64, "bitsandbytes_version": "0.50.2"}
    rocm = {**cuda, "blocksize": 128, "bitsandbytes_version": "0.51.0"}
    assert quantization_differences(cuda, rocm) == ("blocksize: 64 vs 128",)
    assert quantization_differences(cuda, cuda) == ()
    assert quantization_differences(cuda, {k: v for k, v in cuda.items() if k != "quant_type"}) == (
        "quant_type: nf4 vs (not recorded)",)


def test_same_adapter_compares_the_folder_name():
    assert same_adapter("runs/adapters/20261125T220450Z", "/mnt/copy/20261125T220450Z/")
    assert not same_adapter("runs/adapters/20261125T220450Z", "runs/adapters/20261125T230000Z")
    assert not same_adapter(None, "runs/adapters/x")


def _pair(a, b, same_weights=True, loss=None, quant=()) -> PairParity:
    tol = Tolerances()
    return PairParity("R1", "R2", (compare_phase("base", a, b, same_weights, tol),), loss, quant)


def test_judge_identical_runs_all_pass():
    qs = questions(np.random.default_rng(4).random(200) < 0.3)
    findings = judge_pair(_pair(qs, qs, loss=loss_drift([2.0, 1.0], [2.0, 1.0])), Tolerances())
    assert findings and all(f.ok for f in findings)
    assert "equivalent within +-3 pp" in findings[0].text and "R2 vs R1, base accuracy" in findings[0].text


def test_judge_names_each_failure():
    ca, cb = from_counts(300, 10, 137, 826)
    a, b = questions(ca), questions(cb, seed=9)  # other log-probabilities: large KL
    pair = _pair(a, b, loss=loss_drift([2.0, 1.0], [2.0, math.inf]), quant=("blocksize: 64 vs 128",))
    findings = judge_pair(pair, Tolerances())
    failed = [f.text for f in findings if not f.ok]
    assert len(failed) == 3
    assert "NOT shown equivalent within +-3 pp" in failed[0]
    assert "mean KL 6.94e-01 nats > 0.01 nats tolerance (max " in failed[1]
    assert failed[1].endswith("nats (reported); settings differ (blocksize: 64 vs 128)")
    assert "NaN/inf loss on 1 steps of R2" in failed[2]
    flags = [f.text for f in findings if f.status == "flag"]
    assert "McNemar p < 0.001" in flags[0] and "settings differ: blocksize: 64 vs 128" in flags[1]


def test_the_kl_tolerance_reads_as_the_mean_kl_and_the_diff_as_reported():
    """Issue 29 item 5: "|diff| mean ... max 0.0156 nats: within the 0.01 nats tolerance" read as a contradiction."""
    ca = np.random.default_rng(5).random(300) < 0.3
    a = questions(ca)
    b = [QuestionResult(q.qid, q.answer, q.pred, (q.logprobs[0] + 0.0156, *q.logprobs[1:])) for q in a]
    (numerics,) = [f for f in judge_pair(_pair(a, b), Tolerances()) if f.point == "numerics"]
    assert numerics.ok
    head, tail = numerics.text.split(" <= 0.01 nats tolerance ", 1)
    assert head.startswith("R2 vs R1, base log-probabilities (same weights): mean KL ") and "diff" not in head
    assert tail.endswith("|diff| mean 0.0039, max 0.0156 nats (reported)")
    assert "within the" not in numerics.text


def test_separately_trained_runs_are_not_judged_on_kl():
    ca = np.random.default_rng(5).random(300) < 0.3
    findings = judge_pair(_pair(questions(ca), questions(ca, seed=11), same_weights=False), Tolerances())
    assert len(findings) == 1 and findings[0].ok  # accuracy only


@pytest.mark.parametrize("kwargs", [{"margin_pp": 0}, {"kl_nats": -1}, {"alpha": 1.5}])
def test_tolerances_are_validated(kwargs):
    with pytest.raises(ValueError):
        Tolerances(**kwargs)
