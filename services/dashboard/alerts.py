"""Alert rules: pure functions from query results to the alerts firing now.

Each rule takes plain rows (dataclasses filled by `monitor.py` from ClickHouse or the
lag probe) and thresholds from `DashboardSettings`, and returns `Alert`s. The `Tracker`
turns successive evaluations into transitions (firing, resolved) for the `alerts` table
and the log; nothing here touches I/O.

| rule | fires when |
|---|---|
| reward_regression | Welch t of (version - parent) mean reward <= -reward_alert_t, n >= reward_alert_min_samples |
| kl_spike | kl_parent > kl_alert_max, or > kl_spike_factor x median of the previous versions (and > kl_spike_floor) |
| dead_letter_spike | >= dlq_alert_min_letters in dlq_window_s and rate >= dlq_spike_factor x the baseline rate |
| consumer_lag | one group's summed lag on one topic > lag_alert_max_messages |
| replica_stuck | a live replica serves another version than the newest, replica_stuck_after_s after its publication |
| replica_dropping_events | a replica lost >= replica_drop_alert_min_events events in replica_drop_window_s |
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.dashboard.settings import DashboardSettings
from services.dashboard.stats import Moments, normal_sf, welch_t


@dataclass(frozen=True)
class Alert:
    """One firing alert; `(rule, key)` identifies it across evaluations."""

    rule: str
    key: str
    message: str
    value: float
    threshold: float
    severity: str = "warning"
    details: dict = field(default_factory=dict, compare=False)

    @property
    def ident(self) -> tuple[str, str]:
        return self.rule, self.key

    def as_dict(self) -> dict:
        return {
            "rule": self.rule,
            "key": self.key,
            "severity": self.severity,
            "message": self.message,
            "value": self.value,
            "threshold": self.threshold,
            "details": self.details,
        }


@dataclass(frozen=True)
class VersionReward:
    """Reward moments of one policy version, and the version it was trained from."""

    model: str
    version: int
    parent_version: int | None
    moments: Moments


@dataclass(frozen=True)
class VersionMetric:
    """One eval_metrics figure of one published version."""

    model: str
    version: int
    value: float


@dataclass(frozen=True)
class LagRow:
    """Lag of one consumer group on one partition."""

    group: str
    topic: str
    partition: int
    committed: int
    high_watermark: int

    @property
    def lag(self) -> int:
        return max(self.high_watermark - self.committed, 0)


@dataclass(frozen=True)
class LatestUpdate:
    """The newest model update of a model (a rollback included) and when it was published."""

    model: str
    version: int
    published_at_s: float


@dataclass(frozen=True)
class ReplicaRow:
    """The last status a replica reported."""

    model: str
    replica_id: str
    version: int
    state: str
    seen_at_s: float


@dataclass(frozen=True)
class ReplicaDrops:
    """A replica's cumulative lost-event counts (by reason) at the start and the end of a window."""

    model: str
    replica_id: str
    first: dict[str, int]
    last: dict[str, int]


def reward_regressions(rows: Sequence[VersionReward], t_max: float, min_samples: int) -> list[Alert]:
    """Versions whose mean reward is significantly below their parent's (Welch, one-sided)."""
    by_key = {(r.model, r.version): r for r in rows}
    out = []
    for r in rows:
        if r.parent_version is None:
            continue
        parent = by_key.get((r.model, r.parent_version))
        if parent is None or r.moments.n < min_samples or parent.moments.n < min_samples:
            continue
        t = welch_t(r.moments, parent.moments)
        if t <= -t_max:
            out.append(
                Alert(
                    "reward_regression",
                    f"{r.model}/v{r.version}",
                    f"{r.model} v{r.version} mean reward {r.moments.mean:.3f} is below parent "
                    f"v{parent.version} {parent.moments.mean:.3f} (Welch t={t:.2f} <= -{t_max})",
                    value=round(t, 4),
                    threshold=-t_max,
                    severity="critical",
                    details={
                        "version": r.version,
                        "parent_version": parent.version,
                        "mean": r.moments.mean,
                        "parent_mean": parent.moments.mean,
                        "n": r.moments.n,
                        "parent_n": parent.moments.n,
                        "p_one_sided": normal_sf(-t),
                    },
                )
            )
    return out


def kl_spikes(rows: Sequence[VersionMetric], kl_max: float, factor: float, floor: float, history: int) -> list[Alert]:
    """Versions whose kl_parent is above the bound or a multiple of the recent median."""
    out = []
    by_model: dict[str, list[VersionMetric]] = {}
    for r in sorted(rows, key=lambda r: (r.model, r.version)):
        by_model.setdefault(r.model, []).append(r)
    for model, seq in by_model.items():
        for i, r in enumerate(seq):
            previous = [p.value for p in seq[max(0, i - history) : i]]
            median = statistics.median(previous) if previous else None
            reason = None
            if r.value > kl_max:
                reason, threshold = f"> kl_alert_max {kl_max}", kl_max
            elif median is not None and r.value > floor and r.value > factor * median:
                reason, threshold = f"> {factor} x median {median:.4f} of the previous versions", factor * median
            if reason:
                out.append(
                    Alert(
                        "kl_spike",
                        f"{model}/v{r.version}",
                        f"{model} v{r.version} kl_parent {r.value:.4f} {reason}",
                        value=r.value,
                        threshold=threshold,
                        details={"version": r.version, "median_previous": median},
                    )
                )
    return out


def dead_letter_spike(
    recent: int, baseline: int, recent_s: float, baseline_s: float, min_letters: int, factor: float
) -> list[Alert]:
    """A burst of dead letters: enough of them, and far above the baseline rate."""
    if recent < min_letters:
        return []
    rate = recent / recent_s
    base_rate = baseline / baseline_s if baseline_s > 0 else 0.0
    if base_rate > 0 and rate < factor * base_rate:
        return []
    return [
        Alert(
            "dead_letter_spike",
            "all",
            f"{recent} dead letters in the last {recent_s:.0f} s ({rate * 60:.1f}/min; "
            f"baseline {base_rate * 60:.2f}/min, threshold {factor}x and >= {min_letters})",
            value=float(recent),
            threshold=float(max(min_letters, factor * base_rate * recent_s)),
            details={"rate_per_s": rate, "baseline_rate_per_s": base_rate},
        )
    ]


def lag_over_bound(rows: Iterable[LagRow], max_messages: int) -> list[Alert]:
    """Consumer groups that are more than `max_messages` behind on a topic."""
    totals: dict[tuple[str, str], int] = {}
    for r in rows:
        totals[(r.group, r.topic)] = totals.get((r.group, r.topic), 0) + r.lag
    return [
        Alert(
            "consumer_lag",
            f"{group}/{topic}",
            f"consumer group {group} is {lag} messages behind on {topic} (bound {max_messages})",
            value=float(lag),
            threshold=float(max_messages),
        )
        for (group, topic), lag in sorted(totals.items())
        if lag > max_messages
    ]


def stuck_replicas(
    latest: Sequence[LatestUpdate], replicas: Sequence[ReplicaRow], now_s: float, stuck_after_s: float, live_s: float
) -> list[Alert]:
    """Live replicas that still serve another version well after a new one was published."""
    target = {u.model: u for u in latest}
    out = []
    for r in replicas:
        update = target.get(r.model)
        if update is None or r.version == update.version or r.state == "stopped":
            continue
        if now_s - r.seen_at_s > live_s:
            continue
        behind_s = now_s - update.published_at_s
        if behind_s < stuck_after_s:
            continue
        out.append(
            Alert(
                "replica_stuck",
                f"{r.model}/{r.replica_id}",
                f"replica {r.replica_id} serves {r.model} v{r.version} ({r.state}); v{update.version} "
                f"was published {behind_s:.0f} s ago (bound {stuck_after_s:.0f} s)",
                value=behind_s,
                threshold=stuck_after_s,
                details={"replica_version": r.version, "target_version": update.version, "state": r.state},
            )
        )
    return out


def dropping_replicas(rows: Sequence[ReplicaDrops], min_events: int) -> list[Alert]:
    """Replicas that lost at least `min_events` events within the window. The counts are
    cumulative since the replica started; a restart resets them, so a reason whose count
    went down counts from zero."""
    out = []
    for r in rows:
        grew = {k: n - r.first.get(k, 0) if n >= r.first.get(k, 0) else n for k, n in r.last.items()}
        grew = {k: n for k, n in sorted(grew.items()) if n > 0}
        total = sum(grew.values())
        if total < min_events:
            continue
        reasons = ", ".join(f"{k} {n}" for k, n in grew.items())
        out.append(
            Alert(
                "replica_dropping_events",
                f"{r.model}/{r.replica_id}",
                f"replica {r.replica_id} ({r.model}) lost {total} events ({reasons}); the loop never sees them",
                value=float(total),
                threshold=float(min_events),
                details={"by_reason": grew},
            )
        )
    return out


@dataclass
class AlertInputs:
    """Everything the rules read, gathered once per evaluation."""

    now_s: float
    rewards: list[VersionReward] = field(default_factory=list)
    kl: list[VersionMetric] = field(default_factory=list)
    dead_letters_recent: int = 0
    dead_letters_baseline: int = 0
    lag: list[LagRow] = field(default_factory=list)
    latest_updates: list[LatestUpdate] = field(default_factory=list)
    replicas: list[ReplicaRow] = field(default_factory=list)
    replica_drops: list[ReplicaDrops] = field(default_factory=list)


def evaluate(inputs: AlertInputs, s: DashboardSettings) -> list[Alert]:
    """Every rule over `inputs`; the alerts firing now, in a stable order."""
    alerts = (
        reward_regressions(inputs.rewards, s.reward_alert_t, s.reward_alert_min_samples)
        + kl_spikes(inputs.kl, s.kl_alert_max, s.kl_spike_factor, s.kl_spike_floor, s.kl_spike_history)
        + dead_letter_spike(
            inputs.dead_letters_recent,
            inputs.dead_letters_baseline,
            s.dlq_window_s,
            s.dlq_baseline_s,
            s.dlq_alert_min_letters,
            s.dlq_spike_factor,
        )
        + lag_over_bound(inputs.lag, s.lag_alert_max_messages)
        + stuck_replicas(
            inputs.latest_updates, inputs.replicas, inputs.now_s, s.replica_stuck_after_s, s.replica_live_s
        )
        + dropping_replicas(inputs.replica_drops, s.replica_drop_alert_min_events)
    )
    return sorted(alerts, key=lambda a: a.ident)


class Tracker:
    """Remembers which alerts fire, and reports what started and what stopped."""

    def __init__(self) -> None:
        self.firing: dict[tuple[str, str], Alert] = {}

    def update(self, alerts: Sequence[Alert]) -> tuple[list[Alert], list[Alert]]:
        """Record this evaluation; return (newly firing, resolved)."""
        now = {a.ident: a for a in alerts}
        started = [a for ident, a in now.items() if ident not in self.firing]
        resolved = [a for ident, a in self.firing.items() if ident not in now]
        self.firing = now
        return started, resolved
