"""The canary rollout decision: per model, a candidate version earns its traffic from live reward.

Pure logic, no I/O; `streams/app.py` feeds it and publishes what it returns.

The test. Each counted sample is one Bernoulli outcome, success = `reward >
success_reward_min` (the accept-like signal: an accept, a thumb up, a good rating or a
copy all make the composite reward positive). With `theta = p_candidate - p_stable`, the
statistic is a mixture sequential probability ratio test (mSPRT, Johari, Pekelis & Walsh,
"Always valid inference", 2017) with a normal mixture N(0, tau^2) over theta and the
plug-in variance `V = p_c(1-p_c)/n_c + p_s(1-p_s)/n_s`:

    log LR = 0.5 * log(V / (V + tau^2)) + tau^2 * theta_hat^2 / (2 V (V + tau^2))

Under theta = 0 the likelihood ratio is a nonnegative martingale (asymptotically), so by
Ville's inequality P(it EVER crosses 1/alpha) <= alpha: peeking after every sample does
not inflate the false-promotion rate (bench/rollout.py measures it). The decision:

1. guardrails first, whatever the reward says -> rollback at once when
   - the share of the candidate's requests that failed exceeds stable's by more than
     max_error_frac (once it has min_errors failures),
   - the candidate's request latency p95 exceeds max_latency_p95_ratio x stable's p95
     + latency_p95_slack_ms (once each arm has latency_min_requests answers),
   - the candidate's mean completion length is outside [1/max_length_ratio,
     max_length_ratio] x stable's, or
   - more than max_dead_letter_frac of its generations were dead-lettered;
2. fewer than min_samples_per_arm on either arm -> collect;
3. theta_hat > 0 and log LR >= log(1/promote_alpha) -> promote;
4. theta_hat < 0 and log LR >= log(1/rollback_alpha) -> rollback;
5. both arms together reached max_samples -> rollback (the candidate did not earn its
   traffic within the budget; an equal version is not worth the churn), or, with
   at_budget = "promote_if_not_worse", promote when its observed rate is at least
   stable's (for a loop whose trainer publishes faster than the test can tell small
   improvements apart, e.g. the demo: a version the trainer's gate passed and that is not
   worse in the live split then takes over; a worse one is still rolled back. This mode
   promotes about half of the exactly-equal candidates, by design);
6. otherwise collect.

The split is declarative and lives on the compacted rollouts.v1 topic: every event names
the stable version, the candidate (None when no rollout runs) and the candidate's
traffic share AFTER the event; `decision` says what happened (collect: a rollout runs;
promote / rollback: the candidate named in `arms["rollout.decided_version"]` became
stable / was dropped). The controller changes its split only when it reads an event back
from the topic (`adopt`), operators' events included, so it, every replica and the sink
agree on one order of events.

Requests, failures and latencies come from the replicas, not from samples: a failed
request produces no generation (so no sample), and most answered ones get no feedback.
Each replica reports cumulative per-version counters and a latency histogram (bounded:
services/rollout/latency.py) on replica-status.v1; an arm's figures are the sum over
replica processes of the counters since the rollout started (`traffic_since`). The
candidate's counters count from zero (it is served only during its rollout); stable's
from their value when the controller first saw them during the rollout, so after a
restart of the worker the stable arm restarts from the next report.

Both arms' samples cover the same window: from when the candidate was first seen serving
(`Rollout.serving_ms`: the earliest generation time of a candidate sample, or the time of
the first replica-status report of requests on the candidate, whichever is earlier), not
from when the rollout was declared. Loading a candidate takes a replica seconds to
minutes, and stable samples of that time would otherwise spend the sample budget and
weigh a stable arm from another window. A report comes up to one heartbeat after the
candidate's first request, and samples arrive out of generation order, so the start only
moves earlier as evidence arrives: stable samples generated before the current start
wait (`Rollout.held`, bounded, oldest dropped first) and are counted if it moves back
past them.

A version published while a rollout runs is queued, not swapped in: one pending slot,
a newer version replacing an older pending one. Replacing the running candidate would
throw its evidence away and could starve promotion forever when the trainer publishes
faster than a rollout decides; an unbounded queue would test stale versions. The
pending version starts as the next candidate when the running rollout ends.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from schemas.events import ModelUpdateEvent, ReplicaStatusEvent, RolloutDecision, RolloutEvent
from services.rollout import latency
from services.rollout.arms import ArmCounts, decode_arm, encode_arms

NO_VERSION = -1.0
"""How `rollout.pending_version` says "none" in the arms map (a map of floats)."""
NOT_YET = -1.0
"""How `rollout.serving_ms` says "the candidate has not been seen serving yet"."""
HELD_MAX = 20_000
"""Most stable samples held from before the window's start (the oldest go first)."""


@dataclass(frozen=True)
class RolloutPolicy:
    """The decision's knobs (built from StreamsSettings, where each is documented)."""

    candidate_traffic_frac: float
    promote_alpha: float
    rollback_alpha: float
    mixture_tau: float
    min_samples_per_arm: int
    max_samples: int
    success_reward_min: float
    max_length_ratio: float
    guardrail_min_samples: int
    max_dead_letter_frac: float
    min_dead_letters: int
    max_error_frac: float = 0.05
    min_errors: int = 3
    max_latency_p95_ratio: float = 2.0
    latency_p95_slack_ms: float = 250.0
    latency_min_requests: int = 20
    at_budget: str = "rollback"


@dataclass(frozen=True)
class Verdict:
    """One evaluation of a rollout: the decision, why, and the figures behind it."""

    decision: RolloutDecision
    reason: str
    stats: dict[str, float]


def msprt(n_s: Any, k_s: Any, n_c: Any, k_c: Any, tau: float) -> tuple[Any, Any, Any]:
    """(theta_hat, log LR, V) of the two-proportion mSPRT; works on floats and numpy arrays.

    The variance uses add-one smoothed rates so that an arm with all successes (or none)
    does not claim zero variance."""
    n_s = np.maximum(np.asarray(n_s, dtype=float), 1.0)
    n_c = np.maximum(np.asarray(n_c, dtype=float), 1.0)
    theta = np.asarray(k_c, dtype=float) / n_c - np.asarray(k_s, dtype=float) / n_s
    ps = (np.asarray(k_s, dtype=float) + 1.0) / (n_s + 2.0)
    pc = (np.asarray(k_c, dtype=float) + 1.0) / (n_c + 2.0)
    var = ps * (1.0 - ps) / n_s + pc * (1.0 - pc) / n_c
    t2 = tau * tau
    log_lr = 0.5 * np.log(var / (var + t2)) + t2 * theta * theta / (2.0 * var * (var + t2))
    return theta, log_lr, var


def confidence_half_width(var: float, tau: float, alpha: float) -> float:
    """Half width of the always-valid (1 - alpha) confidence sequence for theta at variance `var`:
    the thetas whose mixture likelihood ratio stays below 1/alpha."""
    t2 = tau * tau
    return math.sqrt(var * (var + t2) / t2 * (2.0 * math.log(1.0 / alpha) + math.log((var + t2) / var)))


def error_guardrail(stable: ArmCounts, candidate: ArmCounts, policy: RolloutPolicy) -> str | None:
    """Why the candidate's failed requests make it go, or None."""
    if candidate.failures < policy.min_errors:
        return None
    if candidate.error_rate > stable.error_rate + policy.max_error_frac:
        return (
            f"guardrail: {candidate.failures} of the candidate's {candidate.requests} requests failed "
            f"({candidate.error_rate:.1%}; stable {stable.error_rate:.1%} of {stable.requests}, "
            f"allowed +{policy.max_error_frac:.1%})"
        )
    return None


def latency_guardrail(stable: ArmCounts, candidate: ArmCounts, policy: RolloutPolicy) -> str | None:
    """Why the candidate's latency p95 makes it go, or None."""
    if min(stable.latency_n, candidate.latency_n) < policy.latency_min_requests:
        return None
    bound = policy.max_latency_p95_ratio * stable.latency_p95_ms + policy.latency_p95_slack_ms
    if candidate.latency_p95_ms > bound:
        return (
            f"guardrail: latency p95 {candidate.latency_p95_ms:.0f} ms over {candidate.latency_n} requests "
            f"is above {policy.max_latency_p95_ratio:g}x stable's {stable.latency_p95_ms:.0f} ms "
            f"+ {policy.latency_p95_slack_ms:g} ms = {bound:.0f} ms"
        )
    return None


def guardrail(stable: ArmCounts, candidate: ArmCounts, policy: RolloutPolicy) -> str | None:
    """Why the candidate must go at once regardless of reward, or None."""
    for rule in (error_guardrail, latency_guardrail):
        breach = rule(stable, candidate, policy)
        if breach is not None:
            return breach
    warm = min(candidate.n, stable.n) >= policy.guardrail_min_samples
    if warm and stable.tokens_sum > 0:
        ratio = candidate.mean_tokens / max(stable.mean_tokens, 1e-9)
        if not 1.0 / policy.max_length_ratio <= ratio <= policy.max_length_ratio:
            return (
                f"guardrail: mean completion length {candidate.mean_tokens:.1f} tokens is {ratio:.2f}x "
                f"stable's {stable.mean_tokens:.1f} (allowed 1/{policy.max_length_ratio:g}"
                f"..{policy.max_length_ratio:g})"
            )
    seen = candidate.n + candidate.dead_letters
    if (
        candidate.dead_letters >= policy.min_dead_letters
        and candidate.dead_letters > policy.max_dead_letter_frac * seen
    ):
        return f"guardrail: {candidate.dead_letters} of the candidate's {seen} generations were dead-lettered"
    return None


def decide(stable: ArmCounts, candidate: ArmCounts, policy: RolloutPolicy) -> Verdict:
    """The decision for one rollout given both arms' counts (the numbered rules of the module doc)."""
    theta, log_lr, var = (
        float(x) for x in msprt(stable.n, stable.successes, candidate.n, candidate.successes, policy.mixture_tau)
    )
    half = confidence_half_width(var, policy.mixture_tau, policy.promote_alpha)
    stats = {
        "stat.diff": theta,
        "stat.log_lr": log_lr,
        "stat.log_promote_threshold": math.log(1.0 / policy.promote_alpha),
        "stat.log_rollback_threshold": math.log(1.0 / policy.rollback_alpha),
        "stat.diff_low": theta - half,
        "stat.diff_high": theta + half,
    }
    breach = guardrail(stable, candidate, policy)
    if breach is not None:
        return Verdict(RolloutDecision.ROLLBACK, breach, stats)
    if min(stable.n, candidate.n) < policy.min_samples_per_arm:
        return Verdict(
            RolloutDecision.COLLECT, f"warming up: fewer than {policy.min_samples_per_arm} samples per arm", stats
        )
    summary = f"rate {candidate.rate:.3f} vs stable {stable.rate:.3f}, log LR {log_lr:.2f}"
    if theta > 0 and log_lr >= stats["stat.log_promote_threshold"]:
        return Verdict(RolloutDecision.PROMOTE, f"candidate better: {summary}", stats)
    if theta < 0 and log_lr >= stats["stat.log_rollback_threshold"]:
        return Verdict(RolloutDecision.ROLLBACK, f"candidate worse: {summary}", stats)
    if stable.n + candidate.n >= policy.max_samples:
        if policy.at_budget == "promote_if_not_worse" and theta >= 0:
            return Verdict(
                RolloutDecision.PROMOTE,
                f"budget of {policy.max_samples} samples spent and the candidate is not worse: {summary}",
                stats,
            )
        return Verdict(
            RolloutDecision.ROLLBACK,
            f"budget of {policy.max_samples} samples spent without evidence of improvement: {summary}",
            stats,
        )
    return Verdict(RolloutDecision.COLLECT, f"collecting: {summary}", stats)


@dataclass(frozen=True)
class Traffic:
    """Cumulative requests, failures and latency histogram of one version on one replica process."""

    requests: int = 0
    failures: int = 0
    latency_ms_buckets: Mapping[str, int] = field(default_factory=dict)


ReplicaKey = tuple[str, int]
"""(replica_id, started_ms): one replica process, whose counters only grow."""


def traffic_of(ev: ReplicaStatusEvent) -> dict[int, Traffic]:
    """A status event's counters per version."""
    return {t.version: Traffic(t.requests, t.failures, dict(t.latency_ms_buckets)) for t in ev.traffic}


def traffic_since(now: Traffic, base: Traffic | None) -> Traffic:
    """What a replica process counted since `base` (all of `now` without one)."""
    if base is None:
        return now
    return Traffic(
        max(now.requests - base.requests, 0),
        max(now.failures - base.failures, 0),
        latency.subtract(now.latency_ms_buckets, base.latency_ms_buckets),
    )


def arm_traffic(arm: ArmCounts, parts: list[Traffic], q: float = 0.95) -> None:
    """Set an arm's request figures from its per-replica shares."""
    hist = latency.merge(p.latency_ms_buckets for p in parts)
    arm.requests = sum(p.requests for p in parts)
    arm.failures = sum(p.failures for p in parts)
    arm.latency_n = latency.total(hist)
    arm.latency_p95_ms = latency.quantile(hist, q) or 0.0


class SampleLike(Protocol):
    """What counting needs from a SampleEvent."""

    generation_id: str
    model: str
    policy_version: int
    reward: float
    completion_token_ids: list[int]
    settle_reason: str
    generated_at_ms: int


@dataclass
class Rollout:
    """The split of one model as last read from rollouts.v1, and the arms counted since."""

    model: str
    stable_version: int
    candidate_version: int | None
    candidate_traffic: float
    started_ms: int
    pending_version: int | None = None
    arms: dict[str, ArmCounts] = field(default_factory=lambda: {"stable": ArmCounts(), "candidate": ArmCounts()})
    counted: set[str] = field(default_factory=set)
    """Generation ids already counted (a sample re-read after a restart counts once)."""
    reported_n: int = 0
    """Samples counted when the last collect report was sent."""
    traffic_base: dict[ReplicaKey, dict[int, Traffic]] = field(default_factory=dict)
    """Per replica process, its counters when this rollout first saw it (see the module doc)."""
    serving_ms: int | None = None
    """When the candidate was first seen serving (None: not yet); stable samples generated
    before it are not counted (see the module doc)."""
    held: deque[tuple[int, bool, float, int]] = field(default_factory=lambda: deque(maxlen=HELD_MAX))
    """Stable samples (generated_at_ms, success, reward, completion tokens) generated before
    `serving_ms` (or while it is None), counted if the window's start moves back past them."""

    def base_for(self, key: ReplicaKey, counters: dict[int, Traffic]) -> dict[int, Traffic]:
        """The baseline of a replica process, set on first sight: nothing if it started after
        the rollout did, else its counters then, the candidate's excepted."""
        base = self.traffic_base.get(key)
        if base is None:
            started_after = key[1] >= self.started_ms
            base = {} if started_after else {v: t for v, t in counters.items() if v != self.candidate_version}
            self.traffic_base[key] = base
        return base

    def update_traffic(
        self, replicas: Mapping[ReplicaKey, dict[int, Traffic]], heard_ms: Mapping[ReplicaKey, int] | None = None
    ) -> None:
        """Both arms' requests, failures and latency p95 from the replicas' latest counters;
        a replica that ran candidate requests marks the candidate serving as of its report
        (`heard_ms`: each replica process's last report time)."""
        if self.candidate_version is None:
            return
        parts: dict[str, list[Traffic]] = {"stable": [], "candidate": []}
        for key, counters in replicas.items():
            base = self.base_for(key, counters)
            for arm, version in (("stable", self.stable_version), ("candidate", self.candidate_version)):
                if version in counters:
                    share = traffic_since(counters[version], base.get(version))
                    parts[arm].append(share)
                    if arm == "candidate" and share.requests > 0 and heard_ms is not None and key in heard_ms:
                        self.candidate_serving(heard_ms[key])
        for arm, shares in parts.items():
            arm_traffic(self.arms[arm], shares)

    def candidate_serving(self, at_ms: int) -> None:
        """The candidate served at `at_ms`: the window starts then unless it did earlier (held
        stable samples generated since are counted, older ones keep waiting)."""
        if self.serving_ms is not None and self.serving_ms <= at_ms:
            return
        self.serving_ms = at_ms
        before: deque[tuple[int, bool, float, int]] = deque(maxlen=HELD_MAX)
        for entry in self.held:
            if entry[0] >= at_ms:
                self._add("stable", *entry[1:])
            else:
                before.append(entry)
        self.held = before

    def _add(self, arm: str, success: bool, reward: float, tokens: int) -> None:
        a = self.arms[arm]
        a.n += 1
        a.successes += int(success)
        a.reward_sum += reward
        a.tokens_sum += tokens

    @property
    def key(self) -> tuple[int, int | None, int]:
        """What identifies one rollout: a change means fresh arms."""
        return self.stable_version, self.candidate_version, self.started_ms

    def arm_of(self, version: int) -> str | None:
        """`stable`, `candidate`, or None for a version outside the split."""
        if self.candidate_version is None:
            return None
        if version == self.candidate_version:
            return "candidate"
        return "stable" if version == self.stable_version else None

    def count(self, sample: SampleLike, policy: RolloutPolicy) -> bool:
        """Count one sample if it belongs to this rollout's window (a stable one from before
        the window's start waits in `held`); True if it was counted or held."""
        arm = self.arm_of(sample.policy_version)
        if (
            arm is None
            or str(sample.settle_reason) == "correction"
            or sample.generated_at_ms < self.started_ms
            or sample.generation_id in self.counted
        ):
            return False
        entry = (
            sample.generated_at_ms,
            sample.reward > policy.success_reward_min,
            sample.reward,
            len(sample.completion_token_ids),
        )
        if arm == "candidate":
            self.candidate_serving(sample.generated_at_ms)
        elif self.serving_ms is None or sample.generated_at_ms < self.serving_ms:
            self.counted.add(sample.generation_id)
            self.held.append(entry)  # before the window (as far as is known yet)
            return True
        self.counted.add(sample.generation_id)
        self._add(arm, *entry[1:])
        return True

    def metrics(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Arms, statistics and rollout bookkeeping as `RolloutEvent.arms`."""
        out = encode_arms(self.arms)
        out["stable.version"] = float(self.stable_version)
        if self.candidate_version is not None:
            out["candidate.version"] = float(self.candidate_version)
        out["rollout.started_ms"] = float(self.started_ms)
        out["rollout.pending_version"] = NO_VERSION if self.pending_version is None else float(self.pending_version)
        out["rollout.serving_ms"] = NOT_YET if self.serving_ms is None else float(self.serving_ms)
        out["rollout.held_stable_samples"] = float(len(self.held))
        out.update(extra or {})
        return out


def rollout_from_event(ev: RolloutEvent) -> Rollout:
    """The split an event declares, with the arms it reports (a restart recounts them from samples)."""
    pending = ev.arms.get("rollout.pending_version", NO_VERSION)
    serving = ev.arms.get("rollout.serving_ms", NOT_YET)
    return Rollout(
        model=ev.model,
        stable_version=ev.stable_version,
        candidate_version=ev.candidate_version,
        candidate_traffic=ev.candidate_traffic,
        started_ms=int(ev.arms.get("rollout.started_ms", ev.event_time_ms)),
        pending_version=None if pending < 0 else int(pending),
        serving_ms=None if serving < 0 else int(serving),
    )


def _event(r: Rollout, decision: RolloutDecision, reason: str, now_ms: int, **extra: float) -> RolloutEvent:
    return RolloutEvent(
        model=r.model,
        stable_version=r.stable_version,
        candidate_version=r.candidate_version,
        candidate_traffic=r.candidate_traffic if r.candidate_version is not None else 0.0,
        decision=decision,
        reason=reason[:4096],
        arms=r.metrics(extra),
        event_time_ms=now_ms,
    )


def start_event(
    model: str, stable: int, candidate: int, policy: RolloutPolicy, now_ms: int, reason: str, pending: int | None = None
) -> RolloutEvent:
    """A collect event that starts a rollout of `candidate` against `stable` with fresh arms."""
    r = Rollout(model, stable, candidate, policy.candidate_traffic_frac, now_ms, pending)
    return _event(r, RolloutDecision.COLLECT, reason, now_ms)


def conclude(
    r: Rollout, decision: RolloutDecision, reason: str, stats: dict[str, float], policy: RolloutPolicy, now_ms: int
) -> list[RolloutEvent]:
    """The events that end a rollout (promote or rollback), then start the pending version if any."""
    assert r.candidate_version is not None
    decided = r.candidate_version
    stable = decided if decision == RolloutDecision.PROMOTE else r.stable_version
    ended = Rollout(r.model, stable, None, 0.0, r.started_ms, None, r.arms, serving_ms=r.serving_ms)
    versions = {"rollout.decided_version": float(decided), "stable.version": float(r.stable_version)}
    versions["candidate.version"] = float(decided)  # the arms describe the rollout that just ended
    events = [_event(ended, decision, reason, now_ms, **stats, **versions)]
    if r.pending_version is not None and r.pending_version != stable:
        events.append(
            start_event(
                r.model,
                stable,
                r.pending_version,
                policy,
                now_ms,
                f"pending version {r.pending_version} starts after {decision} of {decided}",
            )
        )
    return events


def on_model_update(
    r: Rollout | None, update: ModelUpdateEvent, policy: RolloutPolicy, now_ms: int
) -> list[RolloutEvent]:
    """What a newly published version does to the split (events to publish; may be none)."""
    v = update.version
    if update.rollback:
        base = Rollout(update.model, v, None, 0.0, now_ms) if r is None else r
        ended = Rollout(update.model, v, None, 0.0, base.started_ms, None, base.arms)
        return [
            _event(
                ended,
                RolloutDecision.PROMOTE,
                f"model update republished version {v} as a rollback: it is stable at once",
                now_ms,
                **{"rollout.decided_version": float(v)},
            )
        ]
    if r is None:
        if update.parent_version is None or update.parent_version == v:
            fresh = Rollout(update.model, v, None, 0.0, now_ms)
            return [
                _event(
                    fresh,
                    RolloutDecision.PROMOTE,
                    f"first version {v} of the model: nothing to compare",
                    now_ms,
                    **{"rollout.decided_version": float(v)},
                )
            ]
        return [
            start_event(
                update.model,
                update.parent_version,
                v,
                policy,
                now_ms,
                f"version {v} starts against its parent {update.parent_version}",
            )
        ]
    if v in (r.stable_version, r.candidate_version, r.pending_version) or v < r.stable_version:
        return []
    if r.candidate_version is None:
        return [start_event(r.model, r.stable_version, v, policy, now_ms, f"version {v} starts as candidate")]
    if r.pending_version is not None and v < r.pending_version:
        return []
    queued = Rollout(r.model, r.stable_version, r.candidate_version, r.candidate_traffic, r.started_ms, v, r.arms)
    queued.serving_ms = r.serving_ms
    return [
        _event(queued, RolloutDecision.COLLECT, f"version {v} queued behind candidate {r.candidate_version}", now_ms)
    ]


REPLICA_FORGET_MS = 3_600_000
"""A replica process silent this long (event time) no longer counts toward any arm."""


class RolloutController:
    """Every model's rollout in one worker: adopt topic events, count samples, decide on ticks."""

    def __init__(self, policy: RolloutPolicy, report_every_samples: int) -> None:
        self.policy = policy
        self.report_every_samples = report_every_samples
        self.rollouts: dict[str, Rollout] = {}
        self._declared: deque[str] = deque(maxlen=1024)
        """Ids of the events this controller decided (applied at once, skipped on read-back)."""
        self.replicas: dict[str, dict[ReplicaKey, dict[int, Traffic]]] = {}
        """Per model, each replica process's latest counters (replica-status.v1)."""
        self._heard_ms: dict[ReplicaKey, int] = {}

    def declare(self, events: list[RolloutEvent]) -> list[RolloutEvent]:
        """Apply this controller's own decisions now, not when they are read back from the
        topic: a model update or a tick in between must see the outcome (a version
        published just after a rollback must not queue behind the rolled-back candidate
        and revive it). Returns `events`, to be published."""
        for ev in events:
            self.adopt(ev)
            self._declared.append(ev.event_id)
        return events

    def adopt(self, ev: RolloutEvent) -> bool:
        """Take the split an event on rollouts.v1 declares; True if a new rollout (fresh arms) began.
        The read-back of an event this controller declared is a no-op."""
        if ev.event_id in self._declared:
            return False
        new = rollout_from_event(ev)
        old = self.rollouts.get(ev.model)
        if old is not None and old.key == new.key:
            old.candidate_traffic = new.candidate_traffic
            old.pending_version = new.pending_version
            return False
        self.rollouts[ev.model] = new
        new.update_traffic(self.replicas.get(ev.model, {}), self._heard_ms)
        return True

    def on_replica_status(self, ev: ReplicaStatusEvent) -> None:
        """A replica's cumulative per-version counters (for the error-rate and latency guardrails).
        Replica processes not heard from for `REPLICA_FORGET_MS` are forgotten."""
        if ev.started_ms is None:
            return  # a replica too old to count its traffic
        key = (ev.replica_id, ev.started_ms)
        known = self.replicas.setdefault(ev.model, {})
        known[key] = traffic_of(ev)
        self._heard_ms[key] = ev.event_time_ms
        for stale in [k for k, t in self._heard_ms.items() if t < ev.event_time_ms - REPLICA_FORGET_MS]:
            del self._heard_ms[stale]
            for reps in self.replicas.values():
                reps.pop(stale, None)
        r = self.rollouts.get(ev.model)
        if r is not None:
            r.update_traffic(known, self._heard_ms)

    def on_sample(self, sample: SampleLike) -> bool:
        """Count a sample toward its model's running rollout; True if counted (or held for its window)."""
        r = self.rollouts.get(sample.model)
        return r is not None and r.count(sample, self.policy)

    def on_dead_letter(self, model: str, version: int) -> None:
        """A generation of `version` was dead-lettered (for the DLQ guardrail)."""
        r = self.rollouts.get(model)
        arm = None if r is None else r.arm_of(version)
        if r is not None and arm is not None:
            r.arms[arm].dead_letters += 1

    def on_model_update(self, update: ModelUpdateEvent, now_ms: int) -> list[RolloutEvent]:
        """Events a new model update calls for (see `on_model_update`)."""
        return self.declare(on_model_update(self.rollouts.get(update.model), update, self.policy, now_ms))

    def tick(self, now_ms: int) -> list[RolloutEvent]:
        """Evaluate every running rollout: decisions, and a collect report every N samples."""
        out: list[RolloutEvent] = []
        for r in self.rollouts.values():
            if r.candidate_version is None:
                continue
            verdict = decide(r.arms["stable"], r.arms["candidate"], self.policy)
            if verdict.decision != RolloutDecision.COLLECT:
                events = conclude(r, verdict.decision, verdict.reason, verdict.stats, self.policy, now_ms)
                # The decision holds from now on, not from when it is read back from the
                # topic: a model update arriving in between must queue behind the outcome,
                # not behind the candidate just decided on (which it would then revive).
                out.extend(self.declare(events))
                continue
            n = r.arms["stable"].n + r.arms["candidate"].n
            if n - r.reported_n >= self.report_every_samples:
                r.reported_n = n
                out.append(_event(r, RolloutDecision.COLLECT, verdict.reason, now_ms, **verdict.stats))
        return out

    def status(self) -> dict[str, Any]:
        """Per model: the split, the arms and the current statistic (for the status view)."""
        out: dict[str, Any] = {}
        for model, r in self.rollouts.items():
            verdict = decide(r.arms["stable"], r.arms["candidate"], self.policy)
            out[model] = {
                "stable_version": r.stable_version,
                "candidate_version": r.candidate_version,
                "pending_version": r.pending_version,
                "candidate_traffic": r.candidate_traffic,
                "arms": r.metrics(verdict.stats),
                "verdict": verdict.reason if r.candidate_version is not None else "no rollout running",
            }
        return out


def arms_of(ev: RolloutEvent) -> dict[str, ArmCounts]:
    """Both arms' counts as an event reports them."""
    return {name: decode_arm(ev.arms, name) for name in ("stable", "candidate")}


def policy_from_settings(settings: Any) -> RolloutPolicy:
    """The decision's knobs from StreamsSettings (the `rollout_*` fields)."""
    return RolloutPolicy(
        candidate_traffic_frac=settings.rollout_candidate_traffic_frac,
        promote_alpha=settings.rollout_promote_alpha,
        rollback_alpha=settings.rollout_rollback_alpha,
        mixture_tau=settings.rollout_mixture_tau,
        min_samples_per_arm=settings.rollout_min_samples_per_arm,
        max_samples=settings.rollout_max_samples,
        success_reward_min=settings.rollout_success_reward_min,
        max_length_ratio=settings.rollout_max_length_ratio,
        guardrail_min_samples=settings.rollout_guardrail_min_samples,
        max_dead_letter_frac=settings.rollout_max_dead_letter_frac,
        min_dead_letters=settings.rollout_min_dead_letters,
        max_error_frac=settings.rollout_max_error_frac,
        min_errors=settings.rollout_min_errors,
        max_latency_p95_ratio=settings.rollout_max_latency_p95_ratio,
        latency_p95_slack_ms=settings.rollout_latency_p95_slack_ms,
        latency_min_requests=settings.rollout_latency_min_requests,
        at_budget=settings.rollout_at_budget,
    )
