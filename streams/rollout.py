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

1. guardrails first, whatever the reward says: the candidate's mean completion length
   outside [1/max_length_ratio, max_length_ratio] x stable's, or more than
   max_dead_letter_frac of its generations dead-lettered -> rollback at once;
2. fewer than min_samples_per_arm on either arm -> collect;
3. theta_hat > 0 and log LR >= log(1/promote_alpha) -> promote;
4. theta_hat < 0 and log LR >= log(1/rollback_alpha) -> rollback;
5. both arms together reached max_samples -> rollback (the candidate did not earn its
   traffic within the budget; an equal version is not worth the churn);
6. otherwise collect.

The split is declarative and lives on the compacted rollouts.v1 topic: every event names
the stable version, the candidate (None when no rollout runs) and the candidate's
traffic share AFTER the event; `decision` says what happened (collect: a rollout runs;
promote / rollback: the candidate named in `arms["rollout.decided_version"]` became
stable / was dropped). The controller changes its split only when it reads an event back
from the topic (`adopt`), operators' events included, so it, every replica and the sink
agree on one order of events.

A version published while a rollout runs is queued, not swapped in: one pending slot,
a newer version replacing an older pending one. Replacing the running candidate would
throw its evidence away and could starve promotion forever when the trainer publishes
faster than a rollout decides; an unbounded queue would test stale versions. The
pending version starts as the next candidate when the running rollout ends.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from schemas.events import ModelUpdateEvent, RolloutDecision, RolloutEvent
from services.rollout.arms import ArmCounts, decode_arm, encode_arms

NO_VERSION = -1.0
"""How `rollout.pending_version` says "none" in the arms map (a map of floats)."""


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


def guardrail(stable: ArmCounts, candidate: ArmCounts, policy: RolloutPolicy) -> str | None:
    """Why the candidate must go at once regardless of reward, or None."""
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
        return Verdict(
            RolloutDecision.ROLLBACK,
            f"budget of {policy.max_samples} samples spent without evidence of improvement: {summary}",
            stats,
        )
    return Verdict(RolloutDecision.COLLECT, f"collecting: {summary}", stats)


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
        """Count one sample if it belongs to this rollout; True if it was counted."""
        arm = self.arm_of(sample.policy_version)
        if (
            arm is None
            or str(sample.settle_reason) == "correction"
            or sample.generated_at_ms < self.started_ms
            or sample.generation_id in self.counted
        ):
            return False
        self.counted.add(sample.generation_id)
        a = self.arms[arm]
        a.n += 1
        a.successes += int(sample.reward > policy.success_reward_min)
        a.reward_sum += sample.reward
        a.tokens_sum += len(sample.completion_token_ids)
        return True

    def metrics(self, extra: dict[str, float] | None = None) -> dict[str, float]:
        """Arms, statistics and rollout bookkeeping as `RolloutEvent.arms`."""
        out = encode_arms(self.arms)
        out["stable.version"] = float(self.stable_version)
        if self.candidate_version is not None:
            out["candidate.version"] = float(self.candidate_version)
        out["rollout.started_ms"] = float(self.started_ms)
        out["rollout.pending_version"] = NO_VERSION if self.pending_version is None else float(self.pending_version)
        out.update(extra or {})
        return out


def rollout_from_event(ev: RolloutEvent) -> Rollout:
    """The split an event declares, with the arms it reports (a restart recounts them from samples)."""
    pending = ev.arms.get("rollout.pending_version", NO_VERSION)
    return Rollout(
        model=ev.model,
        stable_version=ev.stable_version,
        candidate_version=ev.candidate_version,
        candidate_traffic=ev.candidate_traffic,
        started_ms=int(ev.arms.get("rollout.started_ms", ev.event_time_ms)),
        pending_version=None if pending < 0 else int(pending),
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
    ended = Rollout(r.model, stable, None, 0.0, r.started_ms, None, r.arms)
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
    return [
        _event(queued, RolloutDecision.COLLECT, f"version {v} queued behind candidate {r.candidate_version}", now_ms)
    ]


class RolloutController:
    """Every model's rollout in one worker: adopt topic events, count samples, decide on ticks."""

    def __init__(self, policy: RolloutPolicy, report_every_samples: int) -> None:
        self.policy = policy
        self.report_every_samples = report_every_samples
        self.rollouts: dict[str, Rollout] = {}
        self._declared: deque[str] = deque(maxlen=1024)
        """Ids of the events this controller decided (applied at once, skipped on read-back)."""

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
        return True

    def on_sample(self, sample: SampleLike) -> bool:
        """Count a sample toward its model's running rollout; True if counted."""
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
    )
