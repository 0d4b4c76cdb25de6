"""An accuracy's 95% interval, computed where the figure is made (scoring) and where it is read (a bench case
that saved only the accuracy): one function, so a run record and a bench case carry the same interval.

Pure scipy: the engine, the compare layer and the docs generator all import it without importing each other.
"""

from __future__ import annotations

from scipy.stats import binomtest


def wilson_ci95(correct: int, n: int) -> tuple[float, float]:
    """Wilson score 95% interval of an accuracy of ``correct`` out of ``n``.

    Args:
        correct: questions answered right.
        n: questions scored (> 0).

    Returns:
        (low, high) as fractions.
    """
    ci = binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)
