"""Run-set statistics on synthetic run sets with known effects (no torch), and the run-set file's reader."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy.stats import t as student_t
from scipy.stats import ttest_ind

from medqa_core.compare.runsets import (
    DIFFERS,
    EQUIVALENT,
    INCONCLUSIVE,
    REPEAT,
    SEED,
    RunFigures,
    compare_sets,
    components,
    device_effect,
    permutation_p,
    prediction_bound,
    repeat_of,
    smallest_permutation_p,
    summarize,
    time_to_target,
    welch_tost,
)
from medqa_core.results.record import EvalResult, QuestionResult, RunRecord
from medqa_core.results.runset import RunSetError, load_runset, runset_from_dict


def synthetic_set(n: int, acc_mean: float, loss_mean: float, seed: int, sd_acc: float = 0.01,
                  sd_loss: float = 0.02, repeat_noise: float = 0.0) -> list[RunFigures]:
    """n seed runs drawn around the means (accuracy as a fraction), plus the first seed's repeat."""
    rng = np.random.default_rng(seed)
    acc = acc_mean + sd_acc * rng.standard_normal(n)
    loss = loss_mean + sd_loss * rng.standard_normal(n)
    curve_steps = (0, 8, 16, 24, 32)
    runs = [RunFigures(s, SEED, float(a), float(x), tuple(10 - 0.05 * i for i in range(32)),
                       tuple((c, 10 - (10 - x) * c / 32) for c in curve_steps), (1.0,) * 32, 0.0)
            for s, (a, x) in enumerate(zip(acc, loss, strict=True))]
    first = runs[0]
    runs.append(RunFigures(first.seed, REPEAT, first.accuracy + repeat_noise, first.eval_loss_nats + repeat_noise,
                           first.loss_per_step, first.curve, first.step_time_s, 0.0))
    return runs


def test_a_planted_device_effect_fails_and_none_passes():
    base = summarize(synthetic_set(10, 0.30, 8.0, seed=1), label="A")
    same = summarize(synthetic_set(10, 0.30, 8.0, seed=2), label="B")  # another machine, no device effect
    shifted = summarize(synthetic_set(10, 0.36, 8.2, seed=2), label="B")  # +6 pp (6 seed sds), +0.2 nats (10 sds)
    holds = compare_sets(base, same, margin_pp=3.0, loss_margin_nats=0.05)
    assert [e.status for e in holds.effects] == [EQUIVALENT, EQUIVALENT] and holds.status == EQUIVALENT
    planted = compare_sets(base, shifted, margin_pp=3.0, loss_margin_nats=0.05)
    assert [e.status for e in planted.effects] == [DIFFERS, DIFFERS] and planted.status == DIFFERS
    acc = planted.effects[0]
    assert acc.diff == pytest.approx(6.0, abs=1.5) and acc.permutation_p < 0.001
    assert acc.in_seed_sds > 3  # the device effect against the seed spread
    # The device component is found where planted and (near) zero where not.
    assert acc.components.device > 2 * acc.components.seed
    assert holds.effects[0].components.device < holds.effects[0].components.seed


def test_tiny_n_is_inconclusive_whatever_the_effect():
    for n in (1, 2, 3):
        a = summarize(synthetic_set(n, 0.30, 8.0, seed=1))
        b = summarize(synthetic_set(n, 0.40, 9.0, seed=2))  # a large effect, too few runs to call it
        result = compare_sets(a, b, margin_pp=3.0)
        assert {e.status for e in result.effects} == {INCONCLUSIVE}, n
        assert "N too small" in result.effects[0].why
    # 3 + 3 runs: the smallest two-sided permutation p is 2 / C(6, 3) = 0.1, never below 0.05.
    assert smallest_permutation_p(3, 3) == pytest.approx(0.1)
    assert smallest_permutation_p(5, 5) == pytest.approx(2 / 252)


def test_a_small_shift_with_wide_seeds_is_inconclusive_not_equivalent():
    a = summarize(synthetic_set(5, 0.30, 8.0, seed=1, sd_acc=0.04))
    b = summarize(synthetic_set(5, 0.31, 8.0, seed=2, sd_acc=0.04))
    effect = compare_sets(a, b, margin_pp=3.0).effects[0]
    assert effect.status == INCONCLUSIVE and "reaches past" in effect.why


def test_permutation_p_is_exact():
    # Every one of the 20 splits of 6 runs into 3 + 3: only the observed one and its mirror are as extreme.
    assert permutation_p([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20)
    assert permutation_p([1, 2, 3], [1, 2, 3]) == 1.0
    # Beyond the exact limit, the Monte Carlo estimate lands near the exact value.
    a, b = [0.0, 0.3, 0.1, 0.5, 0.2], [0.4, 0.6, 0.35, 0.9, 0.7]
    assert permutation_p(a, b, n_samples=100) == pytest.approx(permutation_p(a, b), abs=0.05)


def test_welch_tost_matches_scipy_one_sided_welch_tests():
    rng = np.random.default_rng(3)
    a, b, margin = rng.normal(0, 1, 6), rng.normal(0.3, 2, 8), 1.5
    p, (low, high) = welch_tost(a, b, margin)
    p_low = ttest_ind(b + margin, a, equal_var=False, alternative="greater").pvalue
    p_high = ttest_ind(b - margin, a, equal_var=False, alternative="less").pvalue
    assert p == pytest.approx(max(p_low, p_high))
    # The interval is the 90% Welch interval: equivalence at 0.05 exactly when it lies inside the margin.
    assert (p < 0.05) == (-margin < low and high < margin)
    assert (low + high) / 2 == pytest.approx(b.mean() - a.mean())


def test_components_recover_planted_sources():
    rng = np.random.default_rng(4)
    seed_sd, shift = 1.0, 10.0
    a = rng.normal(0, seed_sd, 200)
    b = rng.normal(shift, seed_sd, 200)
    comp = components(a, b, repeat_diffs=[0.2, -0.2])
    assert comp.seed == pytest.approx(seed_sd, rel=0.1)
    assert comp.device == pytest.approx(shift / math.sqrt(2), rel=0.1)  # sd of two device means shift apart
    assert comp.repeat == pytest.approx(0.2 / math.sqrt(2))
    assert components(a, a + 0.0, []).device == 0.0 and math.isnan(components(a, b, []).repeat)


def test_repeat_floor_and_identical_runs():
    runs = synthetic_set(3, 0.30, 8.0, seed=1)
    rep = repeat_of(runs)
    assert rep is not None and rep.identical and rep.accuracy_pp == 0 and rep.max_train_loss_diff == 0
    noisy = repeat_of(synthetic_set(3, 0.30, 8.0, seed=1, repeat_noise=0.01))
    assert noisy is not None and not noisy.identical and noisy.accuracy_pp == pytest.approx(1.0)
    assert repeat_of([r for r in runs if r.role == SEED]) is None


def test_time_to_target_drops_fastest_and_slowest():
    def run(step: int | None, step_s: float) -> RunFigures:
        curve = ((0, 10.0), (8, 9.0), (16, 8.4 if step == 16 else 8.9), (24, 8.3))
        if step is None:
            curve = ((0, 10.0), (24, 9.0))
        return RunFigures(0, SEED, 0.3, 8.3, (), curve, (step_s,) * 24, 2.0)

    runs = [run(16, 1.0), run(16, 2.0), run(24, 1.0), run(16, 0.5), run(None, 1.0)]
    ttt = time_to_target(runs, 8.5)
    # seconds: compile 2 + steps: 18, 34, 26, 10, never -> drop 10 and never -> mean(18, 26, 34) = 26
    assert ttt.steps == (16, 16, 24, 16, None) and ttt.seconds == (18.0, 34.0, 26.0, 10.0, None)
    assert ttt.result_s == pytest.approx(26.0) and ttt.reached == 4
    two_missed = time_to_target([*runs, run(None, 1.0)], 8.5)
    assert two_missed.result_s is None and "2 of 6 runs never reached" in two_missed.why
    assert time_to_target(runs[:2], 8.5).result_s is None


def test_prediction_bound_is_the_one_sided_t_interval_of_one_more_run():
    summary = summarize(synthetic_set(5, 0.30, 8.0, seed=1))
    s = summary.accuracy
    expected = s.mean - student_t.ppf(0.95, 4) * s.sd * math.sqrt(1.2)
    assert prediction_bound(s) == pytest.approx(expected)
    assert prediction_bound(summary.eval_loss_nats, higher_is_better=False) > summary.eval_loss_nats.max


def test_bad_margin_is_refused():
    with pytest.raises(ValueError, match="positive"):
        device_effect("accuracy", "pp", [1, 2], [1, 2], margin=0)


def test_runset_reader_names_file_and_field(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"kind": "runset", "schema_version": 99}), encoding="utf-8")
    with pytest.raises(RunSetError, match=r"set\.json: schema_version 99, expected 1"):
        load_runset(path)
    with pytest.raises(RunSetError, match="not a run-set file"):
        runset_from_dict({"kind": "run"}, "x.json")
    bad = {"kind": "runset", "schema_version": 1, "fingerprint": {}, "config": {}, "seeds": [0],
           "runs": [{"path": "missing.json", "seed": 0, "role": "seed"}], "target_loss_nats": 8.5,
           "created_utc": "2026-01-01T00:00:00+00:00"}
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(RunSetError, match=r"run of seed 0 \(seed\).*missing\.json"):
        load_runset(path)


def _candidate(accuracy: float, loss: float) -> RunRecord:
    """A record whose fine-tuned scores have this accuracy (of 100 questions) and answer-token loss."""
    n_right = round(100 * accuracy)
    questions = tuple(QuestionResult(f"q{i}", 0, 0 if i < n_right else 1, (-loss, -loss / 2, -99.0, -99.0))
                      for i in range(100))
    after = EvalResult("test.jsonl", 100, n_right / 100, (0.0, 1.0), 1000, 1.0, 100.0, None, questions)
    return RunRecord("run", {}, {}, {}, {}, eval_after=after)


def test_gate_against_a_run_set_fails_outside_its_spread():
    from medqa_core.gate.checks import INCONCLUSIVE as GATE_INCONCLUSIVE
    from medqa_core.gate.runset import spread_checks

    summary = summarize(synthetic_set(5, 0.30, 8.0, seed=1))  # sd 1 pp, 0.02 nats
    inside = spread_checks(summary, _candidate(summary.accuracy.mean, summary.eval_loss_nats.mean), 0.05)
    assert [c.status for c in inside] == ["pass", "pass"]
    worse = spread_checks(summary, _candidate(summary.accuracy.mean - 0.05, summary.eval_loss_nats.mean + 0.2), 0.05)
    assert [c.status for c in worse] == ["fail", "fail"] and "below the baseline set's bound" in worse[0].message
    few = spread_checks(summarize(synthetic_set(2, 0.30, 8.0, seed=1)), _candidate(0.1, 9.0), 0.05)
    assert {c.status for c in few} == {GATE_INCONCLUSIVE}
