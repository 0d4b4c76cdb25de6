"""Parity statistics between two runs: paired accuracy, log-probability drift, loss drift, quantization.

Pure functions of per-question results and arrays: nothing here imports torch, so the statistics
are testable anywhere and the report (``medqa_core.report``) only formats what they return.

Accuracy is compared on the same questions, joined by ``qid``: a paired bootstrap 95% CI of the
difference, McNemar's exact test on the discordant pairs, and an equivalence test (TOST) at a
margin in percentage points. Numerical parity compares the four option log-probabilities of each
question and the training loss step by step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

import numpy as np
from scipy.special import log_softmax
from scipy.stats import binomtest, norm

from medqa_core.record import QuestionResult

# "under 3% difference": the accuracy gap a public MedQA case study reported between ROCm and CUDA.
DEFAULT_MARGIN_PP = 3.0
# Mean KL divergence (nats) between the four-option distributions of two runs scoring the same
# weights. bf16 kernels that sum in another order move log-probabilities by ~1e-2, which gives a KL
# near 1e-4 on four options; 0.01 nats is a hundred times that and far below a changed prediction.
DEFAULT_KL_TOLERANCE_NATS = 0.01
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
ALPHA = 0.05
# Not quantization settings: the library version (shown in fingerprints) and bitsandbytes' CPU-only
# inference repacking, which medqa-parity always keeps off (model.keep_trainable_cpu_format).
_QUANT_IGNORED = ("bitsandbytes_version", "cpu_packed_inference")


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
    """Everything compared between run A (the reference of the pair) and run B."""

    a: str
    b: str
    phases: tuple[PhaseParity, ...]
    loss: LossDrift | None
    quantization_diffs: tuple[str, ...]


PASS, FAIL, FLAG = "pass", "fail", "flag"


@dataclass(frozen=True)
class Finding:
    """One point of the verdict.

    Attributes:
        status: "fail" (parity does not hold because of ``text``), "pass", or "flag" (a difference
            a reader should know of that does not break parity by itself: a detectable systematic
            shift inside the margin, different quantization settings).
        text: the point, with its numbers.
    """

    status: str
    text: str

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


def mcnemar_exact_p(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """McNemar's exact test: are the discordant pairs split evenly between the runs?

    Args:
        correct_a: [N] bool, run A answered right.
        correct_b: [N] bool, run B answered right.

    Returns:
        (a_only, b_only, p): discordant counts and the two-sided exact binomial p-value
        ``binomtest(a_only, a_only + b_only, 0.5)``; p is 1.0 with no discordant pair.
    """
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    if a_only + b_only == 0:
        return a_only, b_only, 1.0
    return a_only, b_only, float(binomtest(a_only, a_only + b_only, 0.5, alternative="two-sided").pvalue)


def paired_bootstrap_ci(correct_a: np.ndarray, correct_b: np.ndarray, level: float = 0.95,
                        n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the paired accuracy difference (B minus A).

    Each paired difference is -1, 0 or +1, so resampling N questions with replacement amounts to
    drawing the counts of the three values from a multinomial: the same distribution as indexing,
    without an [n_resamples, N] index array.

    Args:
        correct_a: [N] bool.
        correct_b: [N] bool.
        level: coverage of the interval.
        n_resamples: bootstrap resamples.
        seed: numpy generator seed; the same inputs give the same interval.

    Returns:
        (low, high) of the difference, as fractions.
    """
    d = correct_b.astype(int) - correct_a.astype(int)  # [N] in {-1, 0, 1}
    n = d.size
    p = np.array([np.sum(d == -1), np.sum(d == 1)]) / n
    counts = np.random.default_rng(seed).multinomial(n, [p[0], p[1], 1 - p.sum()], size=n_resamples)
    diffs = (counts[:, 1] - counts[:, 0]) / n  # [n_resamples]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(diffs, [tail, 100 - tail])
    return float(low), float(high)


def tost(diff: float, se: float, margin: float) -> tuple[float, float]:
    """Two one-sided z-tests of H0: diff <= -margin and H0: diff >= +margin.

    Args:
        diff: observed difference.
        se: its standard error; 0 when every paired difference is the same.
        margin: equivalence margin (> 0), same unit as ``diff``.

    Returns:
        (p_lower, p_upper): equivalence is shown at level alpha when both are below alpha.
    """
    if se == 0:  # no spread: the observed difference is the whole answer
        return float(diff <= -margin), float(diff >= margin)
    return float(norm.sf((diff + margin) / se)), float(norm.cdf((diff - margin) / se))


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
    z = float(norm.ppf(1 - alpha))
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


def quantization_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, ...]:
    """Settings that differ between two runs' quantization dicts (versions are not settings).

    Args:
        a: run A's quantization (record.model["quantization"] or a benchmark's extra_info["quantization"]).
        b: run B's.

    Returns:
        One ``"key: A vs B"`` string per differing setting, sorted by key; empty when they match.
    """
    keys = sorted((a.keys() | b.keys()) - set(_QUANT_IGNORED))
    missing = "(not recorded)"
    return tuple(f"{k}: {a.get(k, missing)} vs {b.get(k, missing)}" for k in keys if a.get(k) != b.get(k))


def same_adapter(adapter_a: str | None, adapter_b: str | None) -> bool:
    """Whether two records name the same saved adapter.

    The folder's last component is compared: an adapter copied to another machine keeps its
    timestamped name (runs/adapters/<UTC time>) but not its parent path.

    Args:
        adapter_a: run A's adapter_dir.
        adapter_b: run B's.

    Returns:
        True when both are set and their last path components are equal.
    """
    if not adapter_a or not adapter_b:
        return False
    return PurePath(adapter_a.rstrip("/\\")).name == PurePath(adapter_b.rstrip("/\\")).name


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
    curve. A significant McNemar test and differing quantization settings are flagged (they
    explain; within the margin a small systematic shift is still parity).

    Args:
        pair: the comparison.
        tol: what counts as parity.

    Returns:
        Findings in a stable order: per phase accuracy then numerics, then loss, then quantization.
    """
    out: list[Finding] = []
    quant = "; quantization differs (" + ", ".join(pair.quantization_diffs) + ")" if pair.quantization_diffs else ""
    for ph in pair.phases:
        out.append(_accuracy_finding(pair, ph, tol))
        if ph.accuracy.mcnemar_p < tol.alpha:
            out.append(Finding(FLAG, f"{pair.b} vs {pair.a}, {ph.phase}: McNemar p = {ph.accuracy.mcnemar_p:.3g} "
                                     f"({ph.accuracy.a_only} vs {ph.accuracy.b_only} discordant questions): "
                                     "a systematic difference is detectable"))
        if ph.same_weights:
            out.append(_numerics_finding(pair, ph, tol, quant))
    if pair.loss is not None:
        out.append(_loss_finding(pair))
    if pair.quantization_diffs:
        out.append(Finding(FLAG, f"{pair.b} vs {pair.a}: quantization settings differ: "
                                 + "; ".join(pair.quantization_diffs)))
    return tuple(out)


def _pp(x: float) -> str:
    return f"{100 * x:+.2f}"


def _accuracy_finding(pair: PairParity, ph: PhaseParity, tol: Tolerances) -> Finding:
    acc = ph.accuracy
    head = (f"{pair.b} vs {pair.a}, {ph.phase} accuracy: {100 * acc.accuracy_b:.1f}% vs {100 * acc.accuracy_a:.1f}%, "
            f"difference {_pp(acc.diff)} pp (paired bootstrap 95% CI {_pp(acc.ci95[0])} to {_pp(acc.ci95[1])}, "
            f"n = {acc.n}), agreement {100 * acc.agreement:.1f}%")
    if acc.equivalent:
        return Finding(PASS, f"{head}: equivalent within +-{tol.margin_pp:g} pp (TOST p = {acc.tost_p:.3g})")
    return Finding(FAIL, f"{head}: NOT shown equivalent within +-{tol.margin_pp:g} pp (TOST p = {acc.tost_p:.3g}; "
                          f"90% CI {_pp(acc.ci90[0])} to {_pp(acc.ci90[1])} pp)")


def _numerics_finding(pair: PairParity, ph: PhaseParity, tol: Tolerances, quant: str) -> Finding:
    lp = ph.logprobs
    head = (f"{pair.b} vs {pair.a}, {ph.phase} log-probabilities (same weights): mean KL {lp.kl_mean:.2e} nats "
            f"(max {lp.kl_max:.2e}), |diff| mean {lp.mean_abs:.3g} max {lp.max_abs:.3g} nats")
    if lp.nonfinite:
        return Finding(FAIL, f"{head}; {lp.nonfinite} questions have NaN or inf log-probabilities{quant}")
    if not lp.kl_mean <= tol.kl_nats:
        return Finding(FAIL, f"{head}: above the {tol.kl_nats:g} nats tolerance{quant}")
    return Finding(PASS, f"{head}: within the {tol.kl_nats:g} nats tolerance")


def _loss_finding(pair: PairParity) -> Finding:
    ld = pair.loss
    assert ld is not None
    head = (f"{pair.b} vs {pair.a}, loss curves over {ld.steps_compared} common steps: max |diff| {ld.max_abs:.3g} "
            f"at step {ld.max_at_step}, mean {ld.mean_abs:.3g}")
    if ld.nonfinite_a or ld.nonfinite_b:
        return Finding(FAIL, f"{head}; NaN/inf loss on {ld.nonfinite_b} steps of {pair.b} and {ld.nonfinite_a} "
                              f"of {pair.a}")
    return Finding(PASS, f"{head} (reported; separately trained runs are judged on accuracy)")
