"""Parity statistics between two runs: paired accuracy, log-probability drift, loss drift, quantization.

Pure functions of per-question results and arrays: nothing here imports torch, so the statistics
are testable anywhere; the report and the gate only format what they return. The statistics
themselves live in :mod:`medqa_core.compare.stats`.

Accuracy is compared on the same questions, joined by ``qid``: a paired bootstrap 95% CI of the
difference, McNemar's exact test on the discordant pairs, and an equivalence test (TOST) at a
margin in percentage points. Numerical parity compares the four option log-probabilities of each
question and the training loss step by step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax

from medqa_core.compare.stats import (
    BOOTSTRAP_SEED,
    format_p,
    mcnemar_exact_p,
    paired_bootstrap_ci,
    tost,
    z_quantile,
)
from medqa_core.results.record import QuestionResult

# "under 3% difference": the accuracy gap a public MedQA case study reported between ROCm and CUDA.
DEFAULT_MARGIN_PP = 3.0
# Mean KL divergence (nats) between the four-option distributions of two runs scoring the same
# weights. bf16 kernels that sum in another order move log-probabilities by ~1e-2, which gives a KL
# near 1e-4 on four options; 0.01 nats is a hundred times that and far below a changed prediction.
DEFAULT_KL_TOLERANCE_NATS = 0.01
ALPHA = 0.05


class ParityError(ValueError):
    """Two runs cannot be compared question by question (different questions or answers)."""


@dataclass(frozen=True)
class Tolerances:
    """What the verdict calls parity.

    Attributes:
        margin_pp: equivalence margin for accuracy, in percentage points.
        kl_nats: highest mean KL divergence (nats) allowed between two runs that scored the same weights.
        alpha: significance level of McNemar's test and of each one-sided test of TOST.
    """

    margin_pp: float = DEFAULT_MARGIN_PP
    kl_nats: float = DEFAULT_KL_TOLERANCE_NATS
    alpha: float = ALPHA

    def __post_init__(self) -> None:
        if not self.margin_pp > 0:
            raise ValueError(f"margin must be > 0 percentage points, got {self.margin_pp}")
        if not self.kl_nats >= 0:
            raise ValueError(f"KL tolerance must be >= 0 nats, got {self.kl_nats}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")


@dataclass(frozen=True)
class PairedQuestions:
    """Two runs' results on the same questions, in the first run's order."""

    qids: tuple[str, ...]
    answer: np.ndarray  # [N] index of the right option
    pred_a: np.ndarray  # [N]
    pred_b: np.ndarray  # [N]
    logprobs_a: np.ndarray  # [N, options]
    logprobs_b: np.ndarray  # [N, options]

    @property
    def correct_a(self) -> np.ndarray:
        return self.pred_a == self.answer

    @property
    def correct_b(self) -> np.ndarray:
        return self.pred_b == self.answer


@dataclass(frozen=True)
class AccuracyParity:
    """Paired comparison of accuracy; differences are run B minus run A, as fractions.

    Attributes:
        n: questions compared.
        accuracy_a, accuracy_b: accuracy of each run on them.
        diff: accuracy_b - accuracy_a.
        ci95: paired bootstrap 95% percentile interval of ``diff``.
        se: standard error of the paired difference (normal approximation).
        a_only, b_only: discordant pairs: questions only run A (only run B) answered right.
        mcnemar_p: McNemar's exact two-sided p-value on the discordant pairs.
        margin: equivalence margin (fraction).
        tost_p: the larger p-value of TOST's two one-sided tests.
        ci90: diff +- z(0.95) se, the interval TOST checks against +-margin.
        equivalent: both one-sided tests reject at alpha.
        agreement: share of questions where both runs predicted the same letter.
    """

    n: int
    accuracy_a: float
    accuracy_b: float
    diff: float
    ci95: tuple[float, float]
    se: float
    a_only: int
    b_only: int
    mcnemar_p: float
    margin: float
    tost_p: float
    ci90: tuple[float, float]
    equivalent: bool
    agreement: float


@dataclass(frozen=True)
class LogprobDrift:
    """Per-question drift of option log-probabilities between two runs (B minus A).

    Attributes:
        n: questions compared.
        max_abs: largest absolute difference of any option of any question (nats).
        mean_abs: mean over questions of the mean absolute difference over the options (nats).
        kl_mean, kl_max: KL(A || B) of the softmax over the options, mean and max over questions (nats).
        per_question_max_abs: [N] largest absolute difference over each question's options.
        per_question_kl: [N] KL(A || B) of each question.
        differences: [N * options] every signed difference, for a histogram.
        nonfinite: questions where either run has a non-finite log-probability (left out above).
    """

    n: int
    max_abs: float
    mean_abs: float
    kl_mean: float
    kl_max: float
    per_question_max_abs: tuple[float, ...]
    per_question_kl: tuple[float, ...]
    differences: tuple[float, ...]
    nonfinite: int


@dataclass(frozen=True)
class LossDrift:
    """Step-by-step difference of two training loss curves over their common steps.

    Attributes:
        steps_a, steps_b: length of each curve.
        steps_compared: common steps (the shorter curve).
        max_abs: largest absolute difference over common finite steps.
        mean_abs: mean absolute difference over common finite steps.
        max_at_step: 1-based step of ``max_abs``.
        nonfinite_a, nonfinite_b: steps (of the common ones) where that run's loss is NaN or inf.
    """

    steps_a: int
    steps_b: int
    steps_compared: int
    max_abs: float
    mean_abs: float
    max_at_step: int
    nonfinite_a: int
    nonfinite_b: int


@dataclass(frozen=True)
class PhaseParity:
    """Accuracy and numerical parity of one scoring phase ("base", "fine-tuned") of two runs.

    Attributes:
        phase: which scores were compared.
        accuracy: paired accuracy comparison.
        logprobs: option log-probability drift.
        same_weights: both runs scored the same weights (the base model, or one saved adapter), so
            their log-probabilities should agree within the KL tolerance; runs fine-tuned separately
            are judged on accuracy only.
    """

    phase: str
    accuracy: AccuracyParity
    logprobs: LogprobDrift
    same_weights: bool


@dataclass(frozen=True)
class PairParity:
    """Everything compared between run A (the reference of the pair) and run B.

    Attributes:
        a, b: the runs' short ids ("R1").
        phases: each scoring phase both ran, compared question by question.
        loss: loss-curve drift where both trained.
        settings_diffs: settings that move the numbers and differ, each "field: A vs B"
            (compute dtype, eval packing, quantization; see :mod:`medqa_core.compare.pairs`).
    """

    a: str
    b: str
    phases: tuple[PhaseParity, ...]
    loss: LossDrift | None
    settings_diffs: tuple[str, ...] = ()
    same_hardware: bool = False  # one backend and device: a settings difference is then all that differs

    @property
    def measures_settings(self) -> bool:
        """Same hardware, other settings: the pair measures what the settings change, not parity."""
        return self.same_hardware and bool(self.settings_diffs)


PASS, FAIL, FLAG = "pass", "fail", "flag"
# The points a verdict judges (Finding.point).
ACCURACY, NUMERICS, LOSS, SYSTEMATIC, SETTINGS = "accuracy", "numerics", "loss", "systematic", "settings"


@dataclass(frozen=True)
class Finding:
    """One point of the verdict, as a value: the gate turns it into a check, the report prints ``text``.

    Attributes:
        status: "fail" (parity does not hold because of ``text``), "pass", or "flag" (a difference
            a reader should know of that does not break parity by itself: a detectable systematic
            shift inside the margin, different settings).
        text: the point, with its numbers.
        point: what was judged: "accuracy" (TOST), "numerics" (KL of same-weights scores), "loss"
            (finite loss curves), "systematic" (McNemar) or "settings".
        phase: the scoring phase ("base", "fine-tuned"), or None for loss and settings.
        threshold: the criterion ("+-3 pp", "<= 0.01 nats", "no NaN/inf").
        evidence: the test's figures in short.
        value_a, value_b: the figures judged where they are percentages (accuracy), else NaN.
    """

    status: str
    text: str
    point: str = ""
    phase: str | None = None
    threshold: str = ""
    evidence: str = ""
    value_a: float = float("nan")
    value_b: float = float("nan")

    def __post_init__(self) -> None:
        if self.status not in (PASS, FAIL, FLAG):
            raise ValueError(f"unknown finding status {self.status!r}; use pass, fail or flag")

    @property
    def ok(self) -> bool:
        return self.status != FAIL


def pair_questions(a: Sequence[QuestionResult], b: Sequence[QuestionResult]) -> PairedQuestions:
    """Join two runs' per-question results by ``qid``.

    Args:
        a: run A's results.
        b: run B's results.

    Returns:
        The paired arrays, in run A's order.

    Raises:
        ParityError: a qid repeats, the two runs scored different questions, a question has another
            right answer or number of options in the other run.
    """
    by_qid_a, by_qid_b = _index(a, "run A"), _index(b, "run B")
    if by_qid_a.keys() != by_qid_b.keys():
        only_a = [k for k in by_qid_a if k not in by_qid_b]  # in file order: test.jsonl:65 before :100
        only_b = [k for k in by_qid_b if k not in by_qid_a]
        raise ParityError(f"different question sets: {len(by_qid_a)} vs {len(by_qid_b)} questions, "
                          f"{len(only_a)} only in run A ({_few(only_a)}), {len(only_b)} only in run B ({_few(only_b)})")
    if not by_qid_a:
        raise ParityError("no questions to compare")
    qids = tuple(q.qid for q in a)
    pairs = [(by_qid_a[k], by_qid_b[k]) for k in qids]
    for qa, qb in pairs:
        if qa.answer != qb.answer or len(qa.logprobs) != len(qb.logprobs):
            raise ParityError(f"question {qa.qid}: answer {qa.answer} with {len(qa.logprobs)} options in run A, "
                              f"answer {qb.answer} with {len(qb.logprobs)} options in run B; the runs used "
                              "different data")
    return PairedQuestions(
        qids=qids,
        answer=np.array([qa.answer for qa, _ in pairs]),
        pred_a=np.array([qa.pred for qa, _ in pairs]),
        pred_b=np.array([qb.pred for _, qb in pairs]),
        logprobs_a=np.array([qa.logprobs for qa, _ in pairs], dtype=float),
        logprobs_b=np.array([qb.logprobs for _, qb in pairs], dtype=float),
    )


def _index(questions: Sequence[QuestionResult], name: str) -> dict[str, QuestionResult]:
    out: dict[str, QuestionResult] = {}
    for q in questions:
        if q.qid in out:
            raise ParityError(f"{name}: question {q.qid} appears twice")
        out[q.qid] = q
    return out


def _few(items: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(items[:k])
    return shown + (", ..." if len(items) > k else "") if items else "none"


def accuracy_parity(paired: PairedQuestions, margin_pp: float = DEFAULT_MARGIN_PP, alpha: float = ALPHA,
                    seed: int = BOOTSTRAP_SEED) -> AccuracyParity:
    """Compare accuracy of two runs on the same questions.

    Args:
        paired: results joined by :func:`pair_questions`.
        margin_pp: equivalence margin in percentage points.
        alpha: level of each one-sided test (the 1 - 2 alpha interval must lie inside +-margin).
        seed: bootstrap seed.

    Returns:
        The comparison; see :class:`AccuracyParity`.
    """
    ca, cb = paired.correct_a, paired.correct_b
    d = cb.astype(float) - ca.astype(float)  # [N]
    n = d.size
    diff = float(d.mean())
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0
    margin = margin_pp / 100
    a_only, b_only, p_mcnemar = mcnemar_exact_p(ca, cb)
    p_low, p_high = tost(diff, se, margin)
    z = z_quantile(1 - alpha)
    return AccuracyParity(
        n=n, accuracy_a=float(ca.mean()), accuracy_b=float(cb.mean()), diff=diff,
        ci95=paired_bootstrap_ci(ca, cb, seed=seed), se=se, a_only=a_only, b_only=b_only, mcnemar_p=p_mcnemar,
        margin=margin, tost_p=max(p_low, p_high), ci90=(diff - z * se, diff + z * se),
        equivalent=bool(p_low < alpha and p_high < alpha), agreement=float(np.mean(paired.pred_a == paired.pred_b)),
    )


def logprob_drift(paired: PairedQuestions) -> LogprobDrift:
    """Drift of the option log-probabilities and KL(A || B) of the option distributions.

    Args:
        paired: results joined by :func:`pair_questions`.

    Returns:
        Summary and per-question arrays; questions with a non-finite value in either run are
        counted in ``nonfinite`` and left out of the figures (NaN figures if all are).
    """
    la, lb = paired.logprobs_a, paired.logprobs_b  # [N, options]
    finite = np.isfinite(la).all(axis=1) & np.isfinite(lb).all(axis=1)  # [N]
    la, lb = la[finite], lb[finite]
    diff = lb - la  # [M, options]
    pa, qa, qb = np.exp(log_softmax(la, axis=1)), log_softmax(la, axis=1), log_softmax(lb, axis=1)
    kl = np.clip(np.sum(pa * (qa - qb), axis=1), 0.0, None)  # [M]; clip float error below 0
    per_max = np.abs(diff).max(axis=1) if diff.size else np.array([])
    empty = diff.size == 0
    return LogprobDrift(
        n=int(finite.sum()),
        max_abs=float("nan") if empty else float(per_max.max()),
        mean_abs=float("nan") if empty else float(np.abs(diff).mean(axis=1).mean()),
        kl_mean=float("nan") if empty else float(kl.mean()),
        kl_max=float("nan") if empty else float(kl.max()),
        per_question_max_abs=tuple(per_max.tolist()),
        per_question_kl=tuple(kl.tolist()),
        differences=tuple(diff.ravel().tolist()),
        nonfinite=int((~finite).sum()),
    )


def loss_drift(loss_a: Sequence[float], loss_b: Sequence[float]) -> LossDrift:
    """Compare two loss curves step by step over their common steps.

    Args:
        loss_a: run A's loss per optimizer step.
        loss_b: run B's.

    Returns:
        The drift; NaN figures when no common step has finite losses in both.

    Raises:
        ParityError: either curve is empty.
    """
    if not loss_a or not loss_b:
        raise ParityError(f"a loss curve is empty ({len(loss_a)} and {len(loss_b)} steps)")
    k = min(len(loss_a), len(loss_b))
    a, b = np.asarray(loss_a[:k], dtype=float), np.asarray(loss_b[:k], dtype=float)
    finite = np.isfinite(a) & np.isfinite(b)
    absdiff = np.where(finite, np.abs(b - a), -1.0)  # -1 never wins argmax over a real difference
    any_finite = bool(finite.any())
    return LossDrift(
        steps_a=len(loss_a), steps_b=len(loss_b), steps_compared=k,
        max_abs=float(absdiff.max()) if any_finite else float("nan"),
        mean_abs=float(np.abs(b - a)[finite].mean()) if any_finite else float("nan"),
        max_at_step=int(absdiff.argmax()) + 1 if any_finite else 0,
        nonfinite_a=int((~np.isfinite(a)).sum()), nonfinite_b=int((~np.isfinite(b)).sum()),
    )


def compare_phase(phase: str, a: Sequence[QuestionResult], b: Sequence[QuestionResult], same_weights: bool,
                  tol: Tolerances) -> PhaseParity:
    """Accuracy and log-probability parity of one phase.

    Args:
        phase: name of the phase ("base", "fine-tuned").
        a: run A's per-question results.
        b: run B's.
        same_weights: both runs scored the same weights; see :class:`PhaseParity`.
        tol: margin and alpha.

    Returns:
        The phase's comparison.

    Raises:
        ParityError: from :func:`pair_questions`.
    """
    paired = pair_questions(a, b)
    return PhaseParity(phase, accuracy_parity(paired, tol.margin_pp, tol.alpha), logprob_drift(paired), same_weights)


def judge_pair(pair: PairParity, tol: Tolerances) -> tuple[Finding, ...]:
    """The verdict's points for one pair: what holds and what does not, with numbers.

    Parity fails on: accuracy not shown equivalent within the margin (TOST), log-probabilities
    of the same weights drifting past the KL tolerance (or not finite), and NaN or inf in a loss
    curve. A significant McNemar test and differing settings are flagged (they explain; within the
    margin a small systematic shift is still parity). Differing settings (compute dtype, eval packing,
    NF4 settings) are named in each failure; on one backend and device such a pair measures what the
    settings change, not parity: its failures are flagged instead, and the report lists the pair under
    "What the settings alone change".

    Args:
        pair: the comparison.
        tol: what counts as parity.

    Returns:
        Findings in a stable order: per phase accuracy then numerics, then loss, then settings.
    """
    out: list[Finding] = []
    settings = "; settings differ (" + ", ".join(pair.settings_diffs) + ")" if pair.settings_diffs else ""
    for ph in pair.phases:
        out.append(_accuracy_finding(pair, ph, tol))
        acc = ph.accuracy
        if acc.mcnemar_p < tol.alpha:
            out.append(Finding(FLAG, f"{pair.b} vs {pair.a}, {ph.phase}: McNemar {format_p(acc.mcnemar_p)} "
                                     f"({acc.a_only} vs {acc.b_only} discordant questions): "
                                     "a systematic difference is detectable", SYSTEMATIC, ph.phase,
                               f"p >= {tol.alpha:g}", f"McNemar {format_p(acc.mcnemar_p)}"))
        if ph.same_weights:
            out.append(_numerics_finding(pair, ph, tol, settings))
    if pair.loss is not None:
        out.append(_loss_finding(pair))
    if pair.measures_settings:
        out = [dataclasses.replace(f, status=FLAG, text=f"{f.text} [same hardware, other settings: this measures "
                                                           "the settings, not parity]")
               if f.status == FAIL and not _broken(f) else f for f in out]
    if pair.settings_diffs:
        out.append(Finding(FLAG, f"{pair.b} vs {pair.a}: settings differ: " + "; ".join(pair.settings_diffs),
                           SETTINGS, None, "same settings", "; ".join(pair.settings_diffs)))
    return tuple(out)


def _broken(finding: Finding) -> bool:
    """A failure whatever the settings: a loss curve that fails has NaN/inf, and so do such log-probabilities."""
    return finding.point == LOSS or "NaN or inf" in finding.text


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def _accuracy_finding(pair: PairParity, ph: PhaseParity, tol: Tolerances) -> Finding:
    acc = ph.accuracy
    head = (f"{pair.b} vs {pair.a}, {ph.phase} accuracy: {100 * acc.accuracy_b:.1f}% vs {100 * acc.accuracy_a:.1f}%, "
            f"difference {_pp(acc.diff)} pp (paired bootstrap 95% CI {_pp(acc.ci95[0])} to {_pp(acc.ci95[1])}, "
            f"n = {acc.n}), agreement {100 * acc.agreement:.1f}%")
    evidence = (f"diff {_pp(acc.diff)} pp, 90% CI {_pp(acc.ci90[0])} to {_pp(acc.ci90[1])}, TOST "
                f"{format_p(acc.tost_p)}, n={acc.n}")
    point = dict(point=ACCURACY, phase=ph.phase, threshold=f"+-{tol.margin_pp:g} pp", evidence=evidence,
                 value_a=100 * acc.accuracy_a, value_b=100 * acc.accuracy_b)
    if acc.equivalent:
        return Finding(PASS, f"{head}: equivalent within +-{tol.margin_pp:g} pp (TOST {format_p(acc.tost_p)})",
                       **point)
    return Finding(FAIL, f"{head}: NOT shown equivalent within +-{tol.margin_pp:g} pp (TOST {format_p(acc.tost_p)}; "
                          f"90% CI {_pp(acc.ci90[0])} to {_pp(acc.ci90[1])} pp)", **point)


def _numerics_finding(pair: PairParity, ph: PhaseParity, tol: Tolerances, settings: str) -> Finding:
    lp = ph.logprobs
    # The tolerance is on the mean KL alone; the |diff| figures are reported beside it, not judged (a max |diff|
    # above the KL tolerance is no contradiction: nats of log-probability are not nats of KL).
    head = f"{pair.b} vs {pair.a}, {ph.phase} log-probabilities (same weights): mean KL {lp.kl_mean:.2e} nats"
    reported = f"(max {lp.kl_max:.2e}); |diff| mean {lp.mean_abs:.3g}, max {lp.max_abs:.3g} nats (reported)"
    point = dict(point=NUMERICS, phase=ph.phase, threshold=f"<= {tol.kl_nats:g} nats",
                 evidence=f"mean KL {lp.kl_mean:.2e} nats (max {lp.kl_max:.2e}), {lp.nonfinite} non-finite")
    if lp.nonfinite:
        return Finding(FAIL, f"{head} {reported}; {lp.nonfinite} questions have NaN or inf log-probabilities"
                             f"{settings}", **point)
    if not lp.kl_mean <= tol.kl_nats:
        return Finding(FAIL, f"{head} > {tol.kl_nats:g} nats tolerance {reported}{settings}", **point)
    return Finding(PASS, f"{head} <= {tol.kl_nats:g} nats tolerance {reported}", **point)


def _loss_finding(pair: PairParity) -> Finding:
    ld = pair.loss
    assert ld is not None
    head = (f"{pair.b} vs {pair.a}, loss curves over {ld.steps_compared} common steps: max |diff| {ld.max_abs:.3g} "
            f"at step {ld.max_at_step}, mean {ld.mean_abs:.3g}")
    point = dict(point=LOSS, threshold="no NaN/inf",
                 evidence=f"NaN/inf on {ld.nonfinite_b} steps (baseline {ld.nonfinite_a}) of {ld.steps_compared}")
    if ld.nonfinite_a or ld.nonfinite_b:
        return Finding(FAIL, f"{head}; NaN/inf loss on {ld.nonfinite_b} steps of {pair.b} and {ld.nonfinite_a} "
                              f"of {pair.a}", **point)
    return Finding(PASS, f"{head} (reported; separately trained runs are judged on accuracy)", **point)
