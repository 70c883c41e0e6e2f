"""Per-arm counts of a rollout and how they travel in `RolloutEvent.arms` (pure).

`RolloutEvent.arms` is a flat `{name: float}` map (a ClickHouse `Map(String, Float64)`),
so an arm's figures are stored as `<arm>.<field>` (`candidate.successes`) and the
rollout's own figures as `stat.<name>` / `rollout.<name>`. Keys are the contract the
dashboard, the ClickHouse view `rollout_arms` and `rlfeed rollout status` read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

from services.dashboard.stats import wilson_interval

ARMS = ("stable", "candidate")
WILSON_Z = 1.959963984540054
"""Two-sided 95% normal quantile of the per-arm display interval."""


@dataclass
class ArmCounts:
    """What the decision has seen of one arm (one version) since the rollout started."""

    n: int = 0
    """Samples counted (first settlement of each generation; corrections are not counted)."""
    successes: int = 0
    """Samples whose reward was above the success threshold (the accept-like signal)."""
    reward_sum: float = 0.0
    tokens_sum: int = 0
    """Completion tokens over the counted samples (for the length guardrail)."""
    dead_letters: int = 0
    """Generations of this version that were dead-lettered (for the DLQ guardrail)."""
    requests: int = 0
    """Requests the replicas ran on this version since the rollout started (replica-status.v1)."""
    failures: int = 0
    """Of those, the ones that failed (for the error-rate guardrail)."""
    latency_n: int = 0
    """Answered requests behind `latency_p95_ms`."""
    latency_p95_ms: float = 0.0
    """95th percentile of request latency in ms (histogram estimate; for the latency guardrail)."""

    @property
    def error_rate(self) -> float:
        """Share of the requests that failed (0 before any request)."""
        return self.failures / self.requests if self.requests else 0.0

    @property
    def rate(self) -> float:
        """Success rate (0 before any sample)."""
        return self.successes / self.n if self.n else 0.0

    @property
    def mean_tokens(self) -> float:
        """Mean completion length in tokens (0 before any sample)."""
        return self.tokens_sum / self.n if self.n else 0.0


def encode_arms(arms: Mapping[str, ArmCounts]) -> dict[str, float]:
    """`{arm: counts}` as flat metrics, with each arm's rate and 95% Wilson interval."""
    out: dict[str, float] = {}
    for name, arm in arms.items():
        for key, value in asdict(arm).items():
            out[f"{name}.{key}"] = float(value)
        low, high = wilson_interval(arm.successes, arm.n, WILSON_Z)
        out[f"{name}.rate"] = arm.rate
        out[f"{name}.rate_low"] = low
        out[f"{name}.rate_high"] = high
        out[f"{name}.mean_tokens"] = arm.mean_tokens
        out[f"{name}.error_rate"] = arm.error_rate
    return out


def decode_arm(metrics: Mapping[str, float], name: str) -> ArmCounts:
    """One arm's counts back from flat metrics (missing keys read as 0)."""
    values = {}
    for f in fields(ArmCounts):
        raw = metrics.get(f"{name}.{f.name}", 0.0)
        values[f.name] = float(raw) if f.type in ("float", float) else int(raw)
    return ArmCounts(**values)
