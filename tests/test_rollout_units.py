"""Unit tests of the canary rollout: the sticky split, the decision, the controller's
state machine, and the operator events (pure code, no broker)."""

from __future__ import annotations

import random

import pytest

from schemas.events import ModelUpdateEvent, RolloutDecision, RolloutEvent, SampleEvent
from services.rollout.arms import ArmCounts, decode_arm, encode_arms, wilson_interval
from services.rollout.control import operator_event, status_row
from services.serving.split import Split, user_bucket
from streams.rollout import (
    RolloutController,
    confidence_half_width,
    decide,
    msprt,
    policy_from_settings,
)
from streams.settings import StreamsSettings

POLICY = policy_from_settings(StreamsSettings(rollout_min_samples_per_arm=30, rollout_max_samples=10_000))
SHA = "0" * 64


def arm(n: int, k: int, tokens_per: int = 10) -> ArmCounts:
    return ArmCounts(n=n, successes=k, reward_sum=float(k), tokens_sum=n * tokens_per)


# --- sticky split ------------------------------------------------------------------------
def test_bucket_is_stable_uniform_and_per_rollout() -> None:
    assert user_bucket("m", 3, "u1") == user_bucket("m", 3, "u1")
    buckets = [user_bucket("m", 3, f"user-{i}") for i in range(20_000)]
    assert all(0.0 <= b < 1.0 for b in buckets)
    share = sum(b < 0.1 for b in buckets) / len(buckets)
    assert 0.09 < share < 0.11
    # another candidate version draws another slice of users
    other = [user_bucket("m", 4, f"user-{i}") for i in range(20_000)]
    overlap = sum(a < 0.1 and b < 0.1 for a, b in zip(buckets, other, strict=True)) / len(buckets)
    assert overlap < 0.02


def test_split_is_sticky_and_stable_without_user() -> None:
    split = Split(1, 2, 0.5)
    chosen = {u: split.wants_candidate("m", u) for u in (f"u{i}" for i in range(200))}
    assert 50 < sum(chosen.values()) < 150
    assert all(split.wants_candidate("m", u) == c for u, c in chosen.items())
    assert not split.wants_candidate("m", None)
    assert not split.wants_candidate("m", "anonymous")
    assert not Split(1).wants_candidate("m", "u1")
    # raising the share keeps every user already on the candidate there
    wider = Split(1, 2, 0.8)
    assert all(wider.wants_candidate("m", u) for u, c in chosen.items() if c)


# --- the statistic -----------------------------------------------------------------------
def test_msprt_grows_with_evidence_and_is_symmetric() -> None:
    _, small, _ = msprt(100, 50, 100, 60, 0.08)
    _, large, _ = msprt(1000, 500, 1000, 600, 0.08)
    assert large > small
    d1, l1, _ = msprt(500, 250, 500, 300, 0.08)
    d2, l2, _ = msprt(500, 300, 500, 250, 0.08)
    assert d1 == pytest.approx(-d2) and l1 == pytest.approx(l2)
    _, none, _ = msprt(500, 250, 500, 250, 0.08)
    assert none < 0  # no effect: the mixture favours the null


def test_confidence_sequence_covers_the_estimate() -> None:
    v = decide(arm(2000, 1000), arm(300, 180), POLICY)
    assert v.stats["stat.diff_low"] < v.stats["stat.diff"] < v.stats["stat.diff_high"]
    assert confidence_half_width(0.001, 0.08, 0.05) > confidence_half_width(0.0001, 0.08, 0.05)


# --- the decision rules ------------------------------------------------------------------
def test_warm_up_then_promote_rollback_and_budget() -> None:
    assert decide(arm(10, 5), arm(10, 10), POLICY).decision == RolloutDecision.COLLECT
    assert decide(arm(2000, 1000), arm(400, 320), POLICY).decision == RolloutDecision.PROMOTE
    assert decide(arm(2000, 1000), arm(400, 100), POLICY).decision == RolloutDecision.ROLLBACK
    assert decide(arm(2000, 1000), arm(200, 101), POLICY).decision == RolloutDecision.COLLECT
    spent = decide(arm(9000, 4500), arm(1000, 505), POLICY)
    assert spent.decision == RolloutDecision.ROLLBACK and "budget" in spent.reason


def test_guardrails_roll_back_regardless_of_reward() -> None:
    long = decide(arm(100, 10, tokens_per=10), arm(25, 25, tokens_per=30), POLICY)
    assert long.decision == RolloutDecision.ROLLBACK and "length" in long.reason
    short = decide(arm(100, 10, tokens_per=10), arm(25, 25, tokens_per=2), POLICY)
    assert short.decision == RolloutDecision.ROLLBACK
    dlq = ArmCounts(n=40, successes=40, tokens_sum=400, dead_letters=10)
    letters = decide(arm(100, 50), dlq, POLICY)
    assert letters.decision == RolloutDecision.ROLLBACK and "dead-lettered" in letters.reason
    assert decide(arm(100, 50), arm(25, 25, tokens_per=12), POLICY).decision == RolloutDecision.COLLECT


def test_peeking_every_sample_keeps_false_promotions_rare() -> None:
    rng = random.Random(3)
    promoted = 0
    for _ in range(60):
        s, c = ArmCounts(), ArmCounts()
        for _ in range(3000):
            a = c if rng.random() < 0.3 else s
            a.n += 1
            a.successes += rng.random() < 0.5
            a.tokens_sum += 10
            if decide(s, c, POLICY).decision != RolloutDecision.COLLECT:
                break
        promoted += decide(s, c, POLICY).decision == RolloutDecision.PROMOTE
    assert promoted <= 3


# --- the controller: adopt, count, decide, queue -----------------------------------------
def update(v: int, parent: int | None, rollback: bool = False) -> ModelUpdateEvent:
    return ModelUpdateEvent(
        model="m",
        version=v,
        parent_version=parent,
        artifact_kind="full",
        artifact_url=f"m/{v}",
        sha256=SHA,
        size_bytes=1,
        rollback=rollback,
    )


def sample(gid: str, version: int, reward: float, t: int = 10**12, correction: bool = False) -> SampleEvent:
    return SampleEvent(
        generation_id=gid,
        model="m",
        policy_version=version,
        prompt="p",
        completion="c",
        prompt_token_ids=[1],
        completion_token_ids=[1, 2, 3],
        completion_logprobs=[-0.1, -0.1, -0.1],
        reward=reward,
        reward_components={},
        feedback_event_ids=[],
        settle_reason="correction" if correction else "terminal",
        user_id="u",
        generated_at_ms=t,
    )


def start(ctl: RolloutController, v: int, parent: int, t: int) -> RolloutEvent:
    (ev,) = ctl.on_model_update(update(v, parent), t)
    ctl.adopt(ev)
    return ev


def test_controller_starts_counts_dedups_and_promotes() -> None:
    ctl = RolloutController(POLICY, report_every_samples=50)
    ev = start(ctl, 1, 0, t=1000)
    assert ev.decision == "collect" and (ev.stable_version, ev.candidate_version) == (0, 1)
    assert ev.candidate_traffic == POLICY.candidate_traffic_frac
    assert not ctl.on_sample(sample("old", 0, 1.0, t=999))  # before the rollout started
    assert not ctl.on_sample(sample("x", 7, 1.0))  # a version outside the split
    assert ctl.on_sample(sample("g", 1, 1.0)) and not ctl.on_sample(sample("g", 1, 1.0))
    assert not ctl.on_sample(sample("h", 1, 1.0, correction=True))
    for i in range(400):
        ctl.on_sample(sample(f"s{i}", 0, 1.0 if i % 2 else -1.0))
        ctl.on_sample(sample(f"c{i}", 1, 1.0 if i % 5 else -1.0))
    out = ctl.tick(2000)
    assert [e.decision for e in out] == ["promote"]
    assert out[0].stable_version == 1 and out[0].candidate_version is None
    assert out[0].arms["rollout.decided_version"] == 1.0 and out[0].arms["candidate.n"] == 401
    assert ctl.rollouts["m"].candidate_version is None  # the decision holds at once ...
    assert ctl.tick(2001) == []
    assert not ctl.adopt(out[0])  # ... and its read-back from the topic changes nothing
    assert ctl.rollouts["m"].candidate_version is None and ctl.tick(2002) == []


def test_version_published_between_a_rollback_and_its_read_back_starts_fresh() -> None:
    """The race CI caught: v2 arrived after the rollback of v1 was sent but before it was
    read back, queued behind v1, and revived it."""
    ctl = RolloutController(POLICY, report_every_samples=10_000)
    start(ctl, 1, 0, t=1000)
    for i in range(400):
        ctl.on_sample(sample(f"s{i}", 0, 1.0 if i % 5 else -1.0))
        ctl.on_sample(sample(f"c{i}", 1, 1.0 if i % 2 else -1.0))
    (rollback,) = ctl.tick(2000)
    assert rollback.decision == "rollback"
    (started,) = ctl.on_model_update(update(2, 1), 2001)  # before the rollback is read back
    assert (started.stable_version, started.candidate_version) == (0, 2), started.reason
    ctl.adopt(rollback)  # the read-backs arrive late, in order: nothing regresses
    ctl.adopt(started)
    assert (ctl.rollouts["m"].stable_version, ctl.rollouts["m"].candidate_version) == (0, 2)


def test_controller_queues_one_pending_version_and_starts_it_after_rollback() -> None:
    ctl = RolloutController(POLICY, report_every_samples=10_000)
    start(ctl, 1, 0, t=1000)
    (q2,) = ctl.on_model_update(update(2, 1), 1100)
    ctl.adopt(q2)
    (q3,) = ctl.on_model_update(update(3, 2), 1200)
    ctl.adopt(q3)
    assert ctl.rollouts["m"].pending_version == 3 and ctl.rollouts["m"].candidate_version == 1
    assert ctl.on_model_update(update(2, 1), 1300) == []  # older than the pending one
    for i in range(300):
        ctl.on_sample(sample(f"s{i}", 0, 1.0 if i % 4 else -1.0))
        ctl.on_sample(sample(f"c{i}", 1, -1.0 if i % 4 else 1.0))
    rollback, restart = ctl.tick(2000)
    assert rollback.decision == "rollback" and rollback.stable_version == 0 and rollback.candidate_version is None
    assert restart.decision == "collect" and (restart.stable_version, restart.candidate_version) == (0, 3)
    ctl.adopt(rollback)
    ctl.adopt(restart)
    r = ctl.rollouts["m"]
    assert r.candidate_version == 3 and r.pending_version is None and r.arms["candidate"].n == 0


def test_restart_rebuilds_from_the_last_event_and_recounts() -> None:
    ctl = RolloutController(POLICY, report_every_samples=5)
    start(ctl, 1, 0, t=1000)
    for i in range(10):
        ctl.on_sample(sample(f"c{i}", 1, 1.0))
        ctl.on_sample(sample(f"s{i}", 0, 1.0))
    (report,) = ctl.tick(2000)
    fresh = RolloutController(POLICY, report_every_samples=5)
    fresh.adopt(report)
    assert fresh.rollouts["m"].key == ctl.rollouts["m"].key
    assert sum(fresh.on_sample(sample(f"c{i}", 1, 1.0)) for i in range(10)) == 10  # re-read samples count once
    assert sum(fresh.on_sample(sample(f"c{i}", 1, 1.0)) for i in range(10)) == 0
    ctl.adopt(report)  # its own report: same rollout, arms kept
    assert ctl.rollouts["m"].arms["candidate"].n == 10


def test_stable_samples_count_only_from_when_the_candidate_serves() -> None:
    """Issue #14: stable samples from while the candidate was still loading spent the budget."""
    policy = policy_from_settings(StreamsSettings(rollout_min_samples_per_arm=5, rollout_max_samples=100))
    ctl = RolloutController(policy, report_every_samples=5)
    start(ctl, 1, 0, t=1000)
    r = ctl.rollouts["m"]
    # the candidate is loading: 150 stable samples, more than the whole budget, wait
    assert all(ctl.on_sample(sample(f"early{i}", 0, 1.0, t=1100 + i)) for i in range(150))
    assert ctl.on_sample(sample("late", 0, -1.0, t=2500))  # settled early, generated after the load
    assert r.arms["stable"].n == 0 and len(r.held) == 151 and r.serving_ms is None
    assert ctl.on_sample(sample("c0", 1, 1.0, t=2000))  # the candidate's first answer starts the window
    assert r.serving_ms == 2000 and len(r.held) == 150
    assert (r.arms["stable"].n, r.arms["stable"].successes, r.arms["candidate"].n) == (1, 0, 1)
    assert ctl.on_sample(sample("before", 0, 1.0, t=1990))  # before the window (so far): waits
    assert ctl.on_sample(sample("after", 0, 1.0, t=2000))
    assert r.arms["stable"].n == 2 and len(r.held) == 151
    for i in range(1, 6):
        ctl.on_sample(sample(f"c{i}", 1, 1.0, t=2000 + i))
    (report,) = ctl.tick(3000)  # 2 + 6 samples in the window: the budget of 100 is not spent
    assert report.decision == "collect" and report.arms["rollout.serving_ms"] == 2000
    assert (report.arms["stable.n"], report.arms["candidate.n"]) == (2, 6)
    assert report.arms["rollout.held_stable_samples"] == 151
    # a candidate sample generated earlier (settled later) moves the start back past "before"
    assert ctl.on_sample(sample("c-early", 1, 1.0, t=1985)) and r.serving_ms == 1985
    assert r.arms["stable"].n == 3 and len(r.held) == 150  # the loading-time samples still wait
    assert ctl.on_sample(sample("c-later", 1, 1.0, t=2400)) and r.serving_ms == 1985
    # a restarted worker reads the window's start from the last event
    fresh = RolloutController(policy, report_every_samples=5)
    fresh.adopt(report)
    assert fresh.rollouts["m"].serving_ms == 2000
    assert fresh.on_sample(sample("early0", 0, 1.0, t=1100)) and fresh.on_sample(sample("after", 0, 1.0, t=2000))
    assert fresh.rollouts["m"].arms["stable"].n == 1 and len(fresh.rollouts["m"].held) == 1


def test_rollout_events_without_serving_ms_read_as_not_yet() -> None:
    ctl = RolloutController(POLICY, report_every_samples=10_000)
    ev = start(ctl, 1, 0, t=1000)
    assert ev.arms["rollout.serving_ms"] == -1.0
    legacy = ev.model_copy(update={"arms": {k: v for k, v in ev.arms.items() if k != "rollout.serving_ms"}})
    fresh = RolloutController(POLICY, report_every_samples=10_000)
    fresh.adopt(legacy)
    assert fresh.rollouts["m"].serving_ms is None


def test_first_version_and_rollback_updates_are_stable_at_once() -> None:
    ctl = RolloutController(POLICY, report_every_samples=5)
    (first,) = ctl.on_model_update(update(0, None), 1)
    assert first.decision == "promote" and first.stable_version == 0 and first.candidate_version is None
    ctl.adopt(first)
    start(ctl, 2, 0, t=5)
    (back,) = ctl.on_model_update(update(0, None, rollback=True), 6)
    assert back.decision == "promote" and back.stable_version == 0 and back.candidate_version is None


def test_dead_letters_count_against_their_arm() -> None:
    ctl = RolloutController(POLICY, report_every_samples=5)
    start(ctl, 1, 0, t=1000)
    for _ in range(6):
        ctl.on_dead_letter("m", 1)
    ctl.on_dead_letter("m", 0)
    ctl.on_dead_letter("other", 1)
    assert ctl.rollouts["m"].arms["candidate"].dead_letters == 6
    (ev,) = ctl.tick(2000)
    assert ev.decision == "rollback" and "dead-lettered" in ev.reason


# --- arms encoding and operators --------------------------------------------------------
def test_arms_round_trip_and_wilson() -> None:
    a = ArmCounts(n=50, successes=20, reward_sum=3.5, tokens_sum=700, dead_letters=1)
    m = encode_arms({"candidate": a})
    assert decode_arm(m, "candidate") == a
    assert m["candidate.rate_low"] < 0.4 < m["candidate.rate_high"]
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_operator_events() -> None:
    ctl = RolloutController(POLICY, report_every_samples=5)
    running = start(ctl, 1, 0, t=1000)
    promote = operator_event(running, "promote", "looks good")
    assert (promote.stable_version, promote.candidate_version, promote.decision) == (1, None, "promote")
    abort = operator_event(running, "abort")
    assert (abort.stable_version, abort.candidate_version, abort.decision) == (0, None, "rollback")
    with pytest.raises(ValueError):
        operator_event(abort, "promote")
    row = status_row(running)
    assert row["candidate_version"] == 1 and row["arms"]["candidate"]["interval_95"] == [0.0, 1.0]
