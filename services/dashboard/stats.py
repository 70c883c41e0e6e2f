"""Small statistics for alert rules and panels: Welch's t, Wilson intervals, the normal tail."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of a sample: enough for a mean and a variance."""

    n: int
    total: float
    total_sq: float

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else 0.0

    @property
    def variance(self) -> float:
        """Unbiased sample variance (0 for fewer than two values)."""
        if self.n < 2:
            return 0.0
        return max(self.total_sq - self.total * self.total / self.n, 0.0) / (self.n - 1)


def normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def welch_t(a: Moments, b: Moments) -> float:
    """Welch's t of mean(a) - mean(b); 0 when either side has fewer than two values.

    Degrees of freedom are not used: the rules need hundreds of samples per version,
    where the t distribution is the normal one to two decimals.
    """
    if a.n < 2 or b.n < 2:
        return 0.0
    se = math.sqrt(a.variance / a.n + b.variance / b.n)
    if se == 0.0:
        diff = a.mean - b.mean
        return 0.0 if diff == 0 else math.copysign(math.inf, diff)
    return (a.mean - b.mean) / se


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % for z=1.96); (0, 1) with no trials."""
    if trials <= 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
