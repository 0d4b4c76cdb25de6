"""The statistics every comparison uses, each in one place: McNemar, paired bootstrap, TOST, Mann-Whitney.

The Wilson interval of one accuracy belongs to the scoring figure itself (medqa_core.results.accuracy).

Pure functions of numbers and arrays (numpy, scipy): no torch, no records.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest, mannwhitneyu, norm

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


def mcnemar_exact_p(correct_a: np.ndarray, correct_b: np.ndarray,
                    alternative: str = "two-sided") -> tuple[int, int, float]:
    """McNemar's exact test: are the discordant pairs split evenly between the runs?

    Args:
        correct_a: [N] bool, run A answered right.
        correct_b: [N] bool, run B answered right.
        alternative: "two-sided", or "greater" (more questions only run A answered right: B is worse).

    Returns:
        (a_only, b_only, p): discordant counts and the exact binomial p-value
        ``binomtest(a_only, a_only + b_only, 0.5)``; p is 1.0 with no discordant pair.
    """
    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    if a_only + b_only == 0:
        return a_only, b_only, 1.0
    return a_only, b_only, float(binomtest(a_only, a_only + b_only, 0.5, alternative=alternative).pvalue)


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


def z_quantile(p: float) -> float:
    """The standard normal quantile (e.g. 1.645 for 0.95), for TOST's 1 - 2 alpha interval."""
    return float(norm.ppf(p))


def slower_p(candidate_s: Sequence[float], baseline_s: Sequence[float]) -> float:
    """One-sided Mann-Whitney U: are the candidate's round times stochastically greater (slower)?

    Args:
        candidate_s: the candidate's round times.
        baseline_s: the baseline's.

    Returns:
        The p-value.
    """
    return float(mannwhitneyu(candidate_s, baseline_s, alternative="greater").pvalue)


def smallest_slower_p(n_baseline: int, n_candidate: int) -> float:
    """The smallest p :func:`slower_p` can give (every candidate round slower than every baseline round)."""
    return 1 / math.comb(n_baseline + n_candidate, n_candidate) if n_baseline and n_candidate else 1.0


def format_p(p: float, bare: bool = False) -> str:
    """A p-value as a reader needs it: "p < 0.001" below that, else "p = 0.0123" (never "p = 0").

    Args:
        p: the p-value.
        bare: for a table cell headed "p": "< 0.001" or "0.0123".

    Returns:
        The text.
    """
    if not math.isfinite(p):
        return "n/a" if bare else "p = n/a"
    if p < 0.001:
        return "< 0.001" if bare else "p < 0.001"
    return f"{p:.3g}" if bare else f"p = {p:.3g}"
