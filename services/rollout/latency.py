"""A bounded latency histogram and its quantile estimate, for the rollout's latency guardrail (pure).

Replicas count each request's latency into fixed geometric buckets (upper bounds 1 ms x
1.25^k, k = 0..60, then +inf: 62 buckets, about 10 minutes at the top) and report the
cumulative counts on replica-status.v1, keyed by the bucket's upper bound in ms (a sparse
map: only buckets that saw a request). The streams worker adds replicas' counts up per
arm and estimates a quantile by linear interpolation inside the bucket that holds it, so
the estimate is off by at most one bucket width (25% of the value) whatever the traffic,
in constant memory.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping

GROWTH = 1.25
"""Ratio of consecutive bucket bounds: the estimate's worst relative error."""
BOUNDS_MS: tuple[float, ...] = tuple(round(GROWTH**k, 3) for k in range(61))
"""Finite upper bounds (ms) of the buckets; a last bucket (`INF_KEY`) holds the rest."""
INF_KEY = "inf"


def bucket_key(latency_ms: float) -> str:
    """The key of the bucket `latency_ms` falls in (its upper bound, `le` semantics)."""
    i = bisect.bisect_left(BOUNDS_MS, latency_ms)
    return INF_KEY if i >= len(BOUNDS_MS) else repr(BOUNDS_MS[i])


def _bound(key: str) -> float:
    return math.inf if key == INF_KEY else float(key)


def merge(histograms: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Bucket-wise sum of histograms."""
    out: dict[str, int] = {}
    for h in histograms:
        for k, v in h.items():
            out[k] = out.get(k, 0) + int(v)
    return out


def subtract(now: Mapping[str, int], base: Mapping[str, int]) -> dict[str, int]:
    """`now - base` bucket-wise (cumulative counters since `base`; negatives clip to 0)."""
    return {k: v - base.get(k, 0) for k, v in now.items() if v - base.get(k, 0) > 0}


def quantile(histogram: Mapping[str, int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a histogram in ms, interpolated in its bucket; None if empty.

    A quantile in the +inf bucket reads as the largest finite bound (a lower bound)."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q: expected 0 < q <= 1, got {q}")
    items = sorted(((_bound(k), int(v)) for k, v in histogram.items() if int(v) > 0), key=lambda kv: kv[0])
    total = sum(v for _, v in items)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for upper, count in items:
        if seen + count >= rank:
            if math.isinf(upper):
                return BOUNDS_MS[-1]
            i = bisect.bisect_left(BOUNDS_MS, upper)
            lower = BOUNDS_MS[i - 1] if i > 0 else 0.0
            return lower + (upper - lower) * (rank - seen) / count
        seen += count
    return items[-1][0] if not math.isinf(items[-1][0]) else BOUNDS_MS[-1]


def total(histogram: Mapping[str, int]) -> int:
    """Observations in a histogram."""
    return sum(int(v) for v in histogram.values())
