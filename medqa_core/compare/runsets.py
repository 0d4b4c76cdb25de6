"""Run sets: one configuration fine-tuned from several seeds, plus the first seed once more, and the verdict that
separates a device effect from chance.

Two fine-tunes on two vendors never match bit for bit, and on one machine a new seed alone moves accuracy and
loss. So a device effect is judged against the spread of each machine against itself:

- the same-seed repeat (the floor): the first seed trained twice on one machine; on a deterministic machine it
  is zero, on a GPU with atomics it is the non-determinism alone;
- the seed spread: the runs of N seeds on one machine (adapter init, data order, dropout);
- the device effect: the difference of the two machines' seed means.

The test (:func:`device_effect`) takes the seed runs of each machine as independent draws (a seed does not give
the same adapter start or dropout masks on two devices' generators, so runs are not paired by seed):

- equivalence: Welch's two one-sided t-tests (TOST) of the mean difference against a stated margin, i.e. the
  90% Welch interval lies inside +-margin (alpha 0.05);
- difference: an exact permutation test of the mean difference (all C(n_a + n_b, n_a) relabellings), which
  makes no normality assumption and is exact at the small N a run set has;
- "inconclusive" when neither decides, and always below 3 seed runs a side; the text says when N is too small
  for the permutation test to ever reach alpha (3 + 3 runs: smallest p 0.1).

Time to target follows MLPerf Training: the first eval point at or below the target loss, its step and the
seconds of training to it (compile warm-up plus step times; the curve's own scoring left out); the set's result
is the mean with the fastest and slowest run dropped, a run that never reached the target counting as slowest.

Pure functions of records and numbers (numpy, scipy): no torch.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.stats import t as student_t

from medqa_core.compare.inputs import device_label
from medqa_core.results.record import QuestionResult, RunRecord
from medqa_core.results.runset import LoadedRun

SEED, REPEAT = "seed", "repeat"  # a run's role in its set
DEFAULT_TARGET_LOSS_NATS = 8.5  # reached by the tiny preset's default run (about 8.0 at its end) and the 7B's
DEFAULT_LOSS_MARGIN_NATS = 0.05  # eval-loss equivalence margin: exp(0.05) = 5% on the answer letter's perplexity
DEFAULT_ALPHA = 0.05
PERMUTATIONS_EXACT_MAX = 200_000  # relabellings enumerated; beyond, a seeded Monte Carlo sample of this many
PERMUTATION_SEED = 0
# Seed runs a side below which every verdict is inconclusive: two runs give an sd of one degree of freedom (two runs
# that happen to agree would "show" equivalence), and a permutation test of 2 + 2 runs cannot reach any usual alpha.
MIN_RUNS = 3


class RunSetStatsError(ValueError):
    """Run sets that cannot be compared (no seed run, a run without the figure compared)."""


def answer_loss_nats(questions: Sequence[QuestionResult]) -> float:
    """Mean negative log-likelihood of each question's right option: the eval loss on the answer tokens.

    With single-token letters (" A".." D", the Mistral tokenizer) it is the cross-entropy of the answer token
    over the whole vocabulary, the quantity ``--loss-on answer`` trains; NaN without questions.
    """
    if not questions:
        return math.nan
    return float(-np.mean([q.logprobs[q.answer] for q in questions]))


@dataclass(frozen=True)
class RunFigures:
    """One run of a set, as its statistics need it.

    Attributes:
        seed: the training seed (adapter init, data order, dropout).
        role: "seed" (one of the N) or "repeat" (the first seed once more).
        accuracy: fine-tuned accuracy (fraction) on the eval split; NaN when not scored.
        eval_loss_nats: fine-tuned answer-token loss on the eval split; NaN when not scored.
        loss_per_step: training loss of every step.
        curve: (step, eval loss) points of the eval curve, step 0 first; empty without a curve.
        step_time_s: every step's wall time.
        compile_s: the compile warm-up before step 1 (0 when eager).
        path: the record's file.
    """

    seed: int
    role: str
    accuracy: float
    eval_loss_nats: float
    loss_per_step: tuple[float, ...]
    curve: tuple[tuple[int, float], ...]
    step_time_s: tuple[float, ...]
    compile_s: float
    path: str = ""

    @classmethod
    def from_record(cls, record: RunRecord, seed: int, role: str = SEED, path: str = "") -> RunFigures:
        """The figures of a saved run record (a "run" record: fine-tuned and scored)."""
        after = record.eval_after
        train = record.train
        return cls(
            seed=seed, role=role,
            accuracy=after.accuracy if after else math.nan,
            eval_loss_nats=answer_loss_nats(after.questions) if after else math.nan,
            loss_per_step=train.loss_per_step if train else (),
            curve=tuple((int(p["step"]), float(p["eval_loss_nats"])) for p in record.eval_curve or ()),
            step_time_s=train.step_time_s if train else (),
            compile_s=float((train.compile.warmup_s if train.compile else None) or 0.0) if train else 0.0,
            path=path,
        )


@dataclass(frozen=True)
class Spread:
    """Mean, sample standard deviation (n - 1) and range of a few values; sd NaN below 2 values."""

    n: int
    mean: float
    sd: float
    min: float
    max: float

    @classmethod
    def from_values(cls, values: Sequence[float]) -> Spread:
        v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
        if v.size == 0:
            return cls(0, math.nan, math.nan, math.nan, math.nan)
        sd = float(v.std(ddof=1)) if v.size > 1 else math.nan
        return cls(int(v.size), float(v.mean()), sd, float(v.min()), float(v.max()))


@dataclass(frozen=True)
class TimeToTarget:
    """MLPerf's time to train of one set: per run the step and seconds at which the eval loss first met the target.

    Attributes:
        target_nats: the eval-loss target.
        steps: per seed run, the step of the first curve point at or below the target (None: never reached).
        seconds: per seed run, compile warm-up plus the step times up to that step (None: never reached).
        result_s: mean of the seconds with the fastest and slowest run dropped (a run that never reached the
            target counts as slowest); None with fewer than 3 runs or when a kept run never reached it.
        spread: of the seconds of the runs that reached the target.
        why: why there is no result ("" when there is one).
    """

    target_nats: float
    steps: tuple[int | None, ...]
    seconds: tuple[float | None, ...]
    result_s: float | None
    spread: Spread
    why: str = ""

    @property
    def reached(self) -> int:
        return sum(s is not None for s in self.steps)


def run_time_to_target(run: RunFigures, target_nats: float) -> tuple[int | None, float | None]:
    """The first curve point at or below ``target_nats``: its step and the training seconds to it."""
    for step, loss in run.curve:
        if math.isfinite(loss) and loss <= target_nats:
            return step, run.compile_s + float(sum(run.step_time_s[:step]))
    return None, None


def time_to_target(runs: Sequence[RunFigures], target_nats: float) -> TimeToTarget:
    """MLPerf-style time to target of a set's seed runs (see :class:`TimeToTarget`)."""
    hits = [run_time_to_target(r, target_nats) for r in runs]
    steps, seconds = tuple(h[0] for h in hits), tuple(h[1] for h in hits)
    spread = Spread.from_values([s for s in seconds if s is not None])
    if not any(r.curve for r in runs):
        return TimeToTarget(target_nats, steps, seconds, None, spread, "no eval curve recorded (run --eval-every)")
    if len(runs) < 3:
        return TimeToTarget(target_nats, steps, seconds, None, spread,
                            f"{len(runs)} runs: dropping the fastest and slowest needs 3 or more")
    ordered = sorted(math.inf if s is None else s for s in seconds)[1:-1]
    if not all(math.isfinite(s) for s in ordered):
        missed = sum(s is None for s in seconds)
        return TimeToTarget(target_nats, steps, seconds, None, spread,
                            f"{missed} of {len(runs)} runs never reached {target_nats:g} nats")
    return TimeToTarget(target_nats, steps, seconds, float(np.mean(ordered)), spread)


@dataclass(frozen=True)
class Repeat:
    """The same-seed floor: the first seed's run against its repeat on the same machine.

    Attributes:
        seed: the seed run twice.
        accuracy_pp: repeat minus first, in points.
        eval_loss_nats: repeat minus first.
        max_train_loss_diff: the largest difference of the two training-loss curves at any step.
        identical: every training loss and both final figures equal bit for bit.
    """

    seed: int
    accuracy_pp: float
    eval_loss_nats: float
    max_train_loss_diff: float
    identical: bool


def repeat_of(runs: Sequence[RunFigures]) -> Repeat | None:
    """The floor of a set: its repeat run against the seed run of the same seed; None without a repeat."""
    repeat = next((r for r in runs if r.role == REPEAT), None)
    first = next((r for r in runs if r.role == SEED and repeat is not None and r.seed == repeat.seed), None)
    if repeat is None or first is None:
        return None
    n = min(len(first.loss_per_step), len(repeat.loss_per_step))
    diffs = [abs(a - b) for a, b in zip(first.loss_per_step[:n], repeat.loss_per_step[:n], strict=True)]
    identical = (first.loss_per_step == repeat.loss_per_step and first.accuracy == repeat.accuracy
                 and first.eval_loss_nats == repeat.eval_loss_nats)
    return Repeat(repeat.seed, 100 * (repeat.accuracy - first.accuracy), repeat.eval_loss_nats - first.eval_loss_nats,
                  max(diffs, default=math.nan), identical)


@dataclass(frozen=True)
class LossBand:
    """Training loss per step over a set's seed runs: mean, min and max at each step every run reached."""

    mean: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    @classmethod
    def from_runs(cls, runs: Sequence[RunFigures]) -> LossBand:
        n = min((len(r.loss_per_step) for r in runs), default=0)
        if n == 0:
            return cls((), (), ())
        m = np.asarray([r.loss_per_step[:n] for r in runs], dtype=float)  # [runs, steps]
        return cls(tuple(m.mean(0).tolist()), tuple(m.min(0).tolist()), tuple(m.max(0).tolist()))


@dataclass(frozen=True)
class SetSummary:
    """What a run set's seed runs show: accuracy and eval-loss spreads, the same-seed floor, the loss band, and
    time to target. Built by :func:`summarize`; ``runs`` keeps the figures for the comparison."""

    label: str
    runs: tuple[RunFigures, ...]
    accuracy: Spread  # fractions
    eval_loss_nats: Spread
    repeat: Repeat | None
    band: LossBand
    time_to_target: TimeToTarget

    @property
    def seed_runs(self) -> tuple[RunFigures, ...]:
        return tuple(r for r in self.runs if r.role == SEED)


def summarize(runs: Sequence[RunFigures], target_nats: float = DEFAULT_TARGET_LOSS_NATS,
              label: str = "set") -> SetSummary:
    """Summarize one run set.

    Args:
        runs: its runs; those of role "seed" make the spreads, the "repeat" only the floor.
        target_nats: the eval-loss target of time to target.
        label: how tables name the set (its device).

    Returns:
        The summary.

    Raises:
        RunSetStatsError: no seed run.
    """
    seeds = [r for r in runs if r.role == SEED]
    if not seeds:
        raise RunSetStatsError(f"{label}: no seed run in the set")
    return SetSummary(label, tuple(runs), Spread.from_values([r.accuracy for r in seeds]),
                      Spread.from_values([r.eval_loss_nats for r in seeds]), repeat_of(runs),
                      LossBand.from_runs(seeds), time_to_target(seeds, target_nats))


# ---- the device effect against the seed spread ------------------------------------------------------------------

EQUIVALENT, DIFFERS, INCONCLUSIVE = "equivalent", "differs", "inconclusive"


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's difference of means (b minus a), its standard error and Satterthwaite degrees of freedom.

    Returns:
        (diff, se, df); se 0 and df inf when neither side varies.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return float(b.mean() - a.mean()), 0.0, math.inf
    df = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    return float(b.mean() - a.mean()), se, float(df)


def welch_tost(a: Sequence[float], b: Sequence[float], margin: float,
               alpha: float = DEFAULT_ALPHA) -> tuple[float, tuple[float, float]]:
    """Welch two one-sided t-tests of H0: |mean_b - mean_a| >= margin.

    Args:
        a, b: the two sets' run values (2 or more each).
        margin: the equivalence margin (> 0), in the values' unit.
        alpha: each one-sided test's level; the interval returned is the 1 - 2 alpha one.

    Returns:
        (p, (low, high)): the larger one-sided p (equivalent when p < alpha) and the 1 - 2 alpha Welch interval.
    """
    diff, se, df = welch(a, b)
    if se == 0:  # no spread on either side: the observed difference is the whole answer
        return float(abs(diff) >= margin), (diff, diff)
    p_low = float(student_t.sf((diff + margin) / se, df))
    p_high = float(student_t.cdf((diff - margin) / se, df))
    half = float(student_t.ppf(1 - alpha, df)) * se
    return max(p_low, p_high), (diff - half, diff + half)


def permutation_p(a: Sequence[float], b: Sequence[float], n_samples: int = PERMUTATIONS_EXACT_MAX,
                  seed: int = PERMUTATION_SEED) -> float:
    """Two-sided permutation test of the difference of means: the share of relabellings of the pooled runs whose
    |difference| is at least the observed one (exact when C(n_a + n_b, n_a) <= ``n_samples``, else a seeded
    Monte Carlo estimate, (1 + hits) / (1 + samples))."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    pooled = np.concatenate([a, b])
    n, k = pooled.size, a.size
    observed = abs(b.mean() - a.mean())
    tol = 1e-12 * max(1.0, float(np.abs(pooled).max()))  # ties count as extreme whatever the float rounding
    total = pooled.sum()
    if math.comb(n, k) <= n_samples:
        hits = count = 0
        for idx in itertools.combinations(range(n), k):
            sa = pooled[list(idx)].sum()
            hits += abs((total - sa) / (n - k) - sa / k) >= observed - tol
            count += 1
        return hits / count
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(n_samples):
        perm = rng.permutation(pooled)
        hits += abs(perm[k:].mean() - perm[:k].mean()) >= observed - tol
    return (1 + hits) / (1 + n_samples)


def smallest_permutation_p(n_a: int, n_b: int) -> float:
    """The smallest two-sided permutation p these run counts allow: of the C(n_a + n_b, n_a) labellings, the
    observed one and, with equal counts, its mirror are as extreme."""
    return min(1.0, (2 if n_a == n_b else 1) / math.comb(n_a + n_b, n_a))


@dataclass(frozen=True)
class Components:
    """Standard deviations of the variation's sources, in the metric's unit.

    Attributes:
        repeat: same seed, same machine (from the floor pairs: sqrt(mean d^2 / 2)); NaN without a repeat.
        seed: across seeds within a machine (pooled sd of the seed runs; it includes the repeat's noise).
        device: between the machines (one-way ANOVA, method of moments: sqrt(max(0, MSB - MSW) / n0)).
    """

    repeat: float
    seed: float
    device: float


def components(a: Sequence[float], b: Sequence[float], repeat_diffs: Sequence[float]) -> Components:
    """Decompose the variation of two sets' seed runs (see :class:`Components`)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = np.asarray([x for x in repeat_diffs if math.isfinite(x)], dtype=float)
    repeat = float(math.sqrt(np.mean(d**2) / 2)) if d.size else math.nan
    dfw = a.size + b.size - 2
    ssw = (a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1) if dfw > 0 else math.nan
    msw = ssw / dfw if dfw > 0 else math.nan
    n = a.size + b.size
    grand = (a.sum() + b.sum()) / n
    msb = a.size * (a.mean() - grand) ** 2 + b.size * (b.mean() - grand) ** 2  # k - 1 = 1 degree of freedom
    n0 = n - (a.size**2 + b.size**2) / n
    device = float(math.sqrt(max(0.0, (msb - msw) / n0))) if math.isfinite(msw) else math.nan
    return Components(repeat, float(math.sqrt(msw)) if math.isfinite(msw) else math.nan, device)


@dataclass(frozen=True)
class DeviceEffect:
    """One metric's device effect (b minus a) against the seed spread, and the verdict.

    Attributes:
        metric: "accuracy" or "eval loss".
        unit: "pp" (accuracy, in points) or "nats".
        a, b: each set's spread of the seed runs, in ``unit``.
        diff: mean_b - mean_a.
        ci: the 1 - 2 alpha Welch interval of ``diff`` (TOST's).
        margin: the equivalence margin.
        tost_p: Welch TOST p (equivalent when < alpha).
        permutation_p: exact permutation p of no difference.
        smallest_p: the smallest permutation p these run counts allow.
        components: repeat, seed and device standard deviations.
        status: "equivalent", "differs" or "inconclusive".
        why: the reason, in words, with the figures.
    """

    metric: str
    unit: str
    a: Spread
    b: Spread
    diff: float
    ci: tuple[float, float]
    margin: float
    tost_p: float
    permutation_p: float
    smallest_p: float
    components: Components
    status: str
    why: str

    @property
    def in_seed_sds(self) -> float:
        """|diff| in seed standard deviations (the device effect against the seed spread); NaN without a spread."""
        sd = self.components.seed
        return abs(self.diff) / sd if sd and math.isfinite(sd) else (0.0 if self.diff == 0 else math.inf)


def device_effect(metric: str, unit: str, a: Sequence[float], b: Sequence[float], margin: float,
                  repeat_diffs: Sequence[float] = (), alpha: float = DEFAULT_ALPHA) -> DeviceEffect:
    """Judge the device effect of one metric: equivalent within ``margin`` (Welch TOST), differs (permutation
    test), or inconclusive.

    Args:
        metric: its name in the text ("accuracy").
        unit: the values' unit ("pp", "nats").
        a, b: the seed runs' values of the baseline set and the other.
        margin: equivalence margin (> 0) in ``unit``.
        repeat_diffs: each set's same-seed repeat minus first, for the repeat component.
        alpha: the tests' level.

    Returns:
        The effect and verdict. Below :data:`MIN_RUNS` runs a side it is inconclusive (no spread to judge by).

    Raises:
        ValueError: a margin that is not a positive number.
    """
    if not (margin > 0 and math.isfinite(margin)):
        raise ValueError(f"{metric} margin {margin!r}: give a positive number")
    a = [x for x in a if math.isfinite(x)]
    b = [x for x in b if math.isfinite(x)]
    sa, sb = Spread.from_values(a), Spread.from_values(b)
    diff = sb.mean - sa.mean if a and b else math.nan
    if min(len(a), len(b)) < MIN_RUNS:
        return DeviceEffect(metric, unit, sa, sb, diff, (math.nan, math.nan), margin, math.nan, math.nan, math.nan,
                            Components(math.nan, math.nan, math.nan), INCONCLUSIVE,
                            f"N too small: {len(a)} and {len(b)} seed runs; a verdict needs {MIN_RUNS} or more a side "
                            "(use --repeats 5 or more)")
    tost_p, ci = welch_tost(a, b, margin, alpha)
    perm_p = permutation_p(a, b)
    smallest = smallest_permutation_p(len(a), len(b))
    comp = components(a, b, repeat_diffs)
    equivalent, differs = tost_p < alpha, perm_p < alpha
    ci_text = f"{100 * (1 - 2 * alpha):g}% CI [{ci[0]:+.3g}, {ci[1]:+.3g}] {unit}"
    if equivalent and differs:
        status, why = EQUIVALENT, (f"a device shift of {diff:+.3g} {unit} is detectable (permutation p = "
                                   f"{perm_p:.3g}) but lies within +-{margin:g} {unit} ({ci_text})")
    elif equivalent:
        status, why = EQUIVALENT, f"{ci_text} inside +-{margin:g} {unit} (TOST p = {tost_p:.3g})"
    elif differs:
        status, why = DIFFERS, (f"{diff:+.3g} {unit} beyond the seed spread (permutation p = {perm_p:.3g}, "
                                f"{len(a)} vs {len(b)} runs; {ci_text} not inside +-{margin:g} {unit})")
    elif smallest >= alpha:
        status, why = INCONCLUSIVE, (f"N too small: with {len(a)} and {len(b)} seed runs no permutation p can be "
                                     f"below {alpha:g} (smallest {smallest:.3g}), and the {ci_text} is not inside "
                                     f"+-{margin:g} {unit}")
    else:
        status, why = INCONCLUSIVE, (f"no difference shown (permutation p = {perm_p:.3g}) and no equivalence: the "
                                     f"{ci_text} reaches past +-{margin:g} {unit}; more seeds narrow it")
    return DeviceEffect(metric, unit, sa, sb, diff, ci, margin, tost_p, perm_p, smallest, comp, status, why)


@dataclass(frozen=True)
class SetComparison:
    """Two run sets (two devices or backends) compared: the baseline's summary, the other's, one effect per
    metric (accuracy, eval loss)."""

    a: SetSummary
    b: SetSummary
    effects: tuple[DeviceEffect, ...]
    alpha: float

    @property
    def status(self) -> str:
        """"differs" when any metric differs, else "inconclusive" when any is, else "equivalent"."""
        statuses = {e.status for e in self.effects}
        return DIFFERS if DIFFERS in statuses else INCONCLUSIVE if INCONCLUSIVE in statuses else EQUIVALENT


def compare_sets(a: SetSummary, b: SetSummary, margin_pp: float, loss_margin_nats: float = DEFAULT_LOSS_MARGIN_NATS,
                 alpha: float = DEFAULT_ALPHA) -> SetComparison:
    """The device effect of ``b`` against ``a`` on fine-tuned accuracy (points) and eval loss (nats).

    Args:
        a: the baseline set's summary.
        b: the other set's.
        margin_pp: accuracy equivalence margin, in points.
        loss_margin_nats: eval-loss equivalence margin, in nats.
        alpha: the tests' level.

    Returns:
        The comparison.
    """
    reps = [r for r in (a.repeat, b.repeat) if r is not None]
    acc = device_effect("accuracy", "pp", [100 * r.accuracy for r in a.seed_runs],
                        [100 * r.accuracy for r in b.seed_runs], margin_pp, [r.accuracy_pp for r in reps], alpha)
    loss = device_effect("eval loss", "nats", [r.eval_loss_nats for r in a.seed_runs],
                         [r.eval_loss_nats for r in b.seed_runs], loss_margin_nats,
                         [r.eval_loss_nats for r in reps], alpha)
    return SetComparison(a, b, (acc, loss), alpha)


def prediction_bound(spread: Spread, alpha: float = DEFAULT_ALPHA, higher_is_better: bool = True) -> float:
    """The one-sided 1 - alpha prediction bound of one more run of a set: a fresh run of the baseline's machine
    falls past it with probability alpha (normal runs): mean -+ t(1 - alpha, n - 1) * sd * sqrt(1 + 1/n).

    Args:
        spread: the baseline set's seed runs.
        alpha: the share of the baseline's own runs that would fail.
        higher_is_better: the bound below the mean (accuracy) or above it (loss).

    Returns:
        The bound; NaN below 2 runs.
    """
    if spread.n < 2 or not math.isfinite(spread.sd):
        return math.nan
    half = float(student_t.ppf(1 - alpha, spread.n - 1)) * spread.sd * math.sqrt(1 + 1 / spread.n)
    return spread.mean - half if higher_is_better else spread.mean + half


def summary_dict(summary: SetSummary) -> dict[str, Any]:
    """A summary as a run-set file stores it (``RunSet.summary``): spreads, the floor, time to target."""
    ttt = summary.time_to_target
    return {
        "n_seeds": len(summary.seed_runs),
        "accuracy": asdict(summary.accuracy),
        "eval_loss_nats": asdict(summary.eval_loss_nats),
        "repeat": asdict(summary.repeat) if summary.repeat else None,
        "time_to_target": {"target_nats": ttt.target_nats, "steps": list(ttt.steps), "seconds": list(ttt.seconds),
                           "result_s": ttt.result_s, "spread_s": asdict(ttt.spread), "why": ttt.why},
    }


def summarize_loaded(runs: Sequence[LoadedRun], target_nats: float, label: str) -> SetSummary:
    """:func:`summarize` of a run set read by :func:`medqa_core.results.runset.load_runset`."""
    return summarize([RunFigures.from_record(r.record, r.entry.seed, r.entry.role, str(r.path)) for r in runs],
                     target_nats, label)


def machine_label(fingerprint: dict[str, Any]) -> str:
    """How tables name a set's machine: the device (:func:`~medqa_core.compare.inputs.device_label`) and backend,
    "NVIDIA H100 80GB HBM3 (cuda)", "CPU: Intel(R) Xeon(R) Processor (cpu)"."""
    return f"{device_label(fingerprint)} ({fingerprint.get('backend', '?')})"


def set_summary_lines(summary: SetSummary) -> list[str]:
    """A set's summary as ``run --repeats`` prints it: spreads, the floor, time to target."""
    acc, loss, ttt = summary.accuracy, summary.eval_loss_nats, summary.time_to_target
    lines = [f"run set: {acc.n} seeds; accuracy mean {100 * acc.mean:.2f}%, sd {_pp(acc.sd)}, range "
             f"{100 * acc.min:.2f}..{100 * acc.max:.2f}%",
             f"  eval loss (answer tokens) mean {loss.mean:.4f} nats, sd {_num(loss.sd)}, range "
             f"{loss.min:.4f}..{loss.max:.4f}"]
    rep = summary.repeat
    if rep is not None:
        same = "bit for bit the same" if rep.identical else (
            f"accuracy {rep.accuracy_pp:+.2f} pp, eval loss {rep.eval_loss_nats:+.4g} nats, training loss up to "
            f"{rep.max_train_loss_diff:.3g} apart")
        lines.append(f"  same seed twice (seed {rep.seed}): {same}")
    reached = f"{ttt.reached} of {len(ttt.steps)} runs reached {ttt.target_nats:g} nats"
    if ttt.result_s is not None:
        lines.append(f"  time to target: {ttt.result_s:.1f} s (fastest and slowest dropped; {reached}; sd "
                     f"{_num(ttt.spread.sd)} s; steps {', '.join('-' if s is None else str(s) for s in ttt.steps)})")
    else:
        lines.append(f"  time to target: no result ({ttt.why}; {reached})")
    return lines


def _pp(sd: float) -> str:
    return "n/a" if not math.isfinite(sd) else f"{100 * sd:.2f} pp"


def _num(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{x:.3g}"
