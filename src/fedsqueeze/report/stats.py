"""Statistics across seeds: means with 95% t-intervals, paired differences, and the claim words.

Accuracy is a fraction in [0, 1]; claims speak in points (1 point = 0.01 accuracy).

- :func:`interval`: mean, sample standard deviation (n - 1), and the 95% half-width
  ``t(0.975, n - 1) · sd / sqrt(n)``; one value has no interval.
- :func:`paired_differences`: ``method - reference`` per seed, over the seeds both have; the interval
  of their mean is a paired t-interval (the seed's partition and test set cancel out).
- :func:`claim`: the words a README or report may use, read off the difference's interval only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95


def t_quantile(df: int, confidence: float = CONFIDENCE) -> float:
    """The two-sided Student-t quantile ``t((1 + confidence) / 2, df)`` (12.706 for df = 1 at 95%)."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 1 degree of freedom, got {df}")
    from scipy.stats import t  # scipy is imported only when a report is written

    return float(t.ppf((1.0 + confidence) / 2.0, df))


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with its 95% half-width (None when n < 2)."""

    mean: float
    n: int
    sd: float | None
    half: float | None

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half


def interval(values: list[float], confidence: float = CONFIDENCE) -> Interval:
    """The mean of ``values`` with its t-interval."""
    n = len(values)
    if n == 0:
        raise ValueError("no values")
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, n, None, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, n, sd, t_quantile(n - 1, confidence) * sd / math.sqrt(n))


def paired_differences(method: dict[int, float], reference: dict[int, float]) -> dict[int, float]:
    """``method[s] - reference[s]`` for every seed ``s`` both have."""
    return {s: method[s] - reference[s] for s in sorted(method) if s in reference}


def points(x: float) -> float:
    """Accuracy (a fraction) in points."""
    return 100.0 * x


def _up(x: float) -> float:
    """``x`` rounded up to a tenth: a bound is never reported tighter than it is."""
    return math.ceil(round(x * 10.0, 9)) / 10.0


def claim(diff: Interval | None, reference: str) -> str:
    """What the paired difference (accuracy, method - reference) lets one say.

    - no pairs or one seed: "1 seed: no interval" (no claim is made);
    - interval above 0: "above REF (+a to +b points)";
    - interval below 0: "below REF (a to b points)";
    - interval containing 0: "indistinguishable from REF (within X points)", X the larger bound,
      rounded up to 0.1 so "within X" is never tighter than the interval.
    """
    if diff is None or diff.n == 0:
        return f"not paired with {reference}"
    if diff.half is None or diff.low is None or diff.high is None:
        return f"{diff.n} seed: no interval"
    lo, hi = points(diff.low), points(diff.high)
    if lo > 0:
        return f"above {reference} (+{lo:.1f} to +{hi:.1f} points)"
    if hi < 0:
        return f"below {reference} ({-hi:.1f} to {-lo:.1f} points)"
    return f"indistinguishable from {reference} (within {_up(max(-lo, hi)):.1f} points)"


def binomial_sd(accuracy: float, test_size: int) -> float:
    """The standard deviation of an accuracy measured on ``test_size`` independent test examples."""
    return math.sqrt(accuracy * (1.0 - accuracy) / test_size)
