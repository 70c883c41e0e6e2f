"""Unit tests of the rollout's error-rate and latency guardrails: the latency histogram and
its quantile, the replicas' per-version counters, the pure rules, and the controller's
aggregation of replica-status.v1 reports into arms (pure code, no broker)."""

from __future__ import annotations

import random

import pytest

from schemas.codec import decode, encode
from schemas.events import ReplicaStatusEvent, RolloutDecision
from services.rollout import latency
from services.rollout.arms import ArmCounts, decode_arm, encode_arms
from services.rollout.control import status_row
from services.serving.metrics import VersionTrafficCounter
from streams.rollout import (
    RolloutController,
    decide,
    error_guardrail,
    latency_guardrail,
    policy_from_settings,
)
from streams.settings import StreamsSettings
from tests.test_rollout_units import sample, start

POLICY = policy_from_settings(
    StreamsSettings(
        rollout_max_error_frac=0.05,
        rollout_min_errors=3,
        rollout_max_latency_p95_ratio=2.0,
        rollout_latency_p95_slack_ms=100.0,
        rollout_latency_min_requests=20,
    )
)


# --- the latency histogram ------------------------------------------------------------
def histogram(values: list[float]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        k = latency.bucket_key(v)
        out[k] = out.get(k, 0) + 1
    return out


def test_bucket_keys_are_upper_bounds() -> None:
    assert latency.bucket_key(0.0) == "1.0"
    assert latency.bucket_key(1.0) == "1.0"  # le: the bound belongs to its bucket
    assert latency.bucket_key(1.1) == "1.25"
    assert latency.bucket_key(10**9) == latency.INF_KEY
    assert len(latency.BOUNDS_MS) + 1 == 62
    for v in (1.5, 3.0, 77.7, 1234.5, 98765.0):
        assert v <= float(latency.bucket_key(v)) < v * latency.GROWTH + 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantile_is_within_one_bucket_of_the_exact_one(seed: int) -> None:
    rng = random.Random(seed)
    values = [rng.lognormvariate(5.0, 1.0) for _ in range(5000)]
    exact = sorted(values)[int(0.95 * len(values)) - 1]
    estimate = latency.quantile(histogram(values), 0.95)
    assert estimate is not None
    assert exact / latency.GROWTH <= estimate <= exact * latency.GROWTH


def test_quantile_edges() -> None:
    assert latency.quantile({}, 0.95) is None
    assert latency.quantile({"1.0": 0}, 0.5) is None
    assert latency.quantile({latency.INF_KEY: 3}, 0.95) == latency.BOUNDS_MS[-1]
    # all in the 100..125 ms bucket: interpolated inside it
    key = latency.bucket_key(110.0)
    lower = latency.BOUNDS_MS[latency.BOUNDS_MS.index(float(key)) - 1]
    assert lower <= latency.quantile({key: 10}, 0.5) <= float(key)  # type: ignore[operator]
    with pytest.raises(ValueError, match="q:"):
        latency.quantile({key: 1}, 0.0)


def test_merge_and_subtract_are_bucket_wise() -> None:
    a, b = {"1.0": 2, "1.25": 1}, {"1.25": 4, "inf": 1}
    assert latency.merge([a, b]) == {"1.0": 2, "1.25": 5, "inf": 1}
    assert latency.subtract({"1.0": 5, "1.25": 1}, {"1.0": 2, "1.25": 1}) == {"1.0": 3}
    assert latency.total(a) == 3


# --- the replicas' per-version counters -------------------------------------------------
def test_version_traffic_counter_reports_valid_status_fields() -> None:
    c = VersionTrafficCounter(keep_versions=2)
    c.ran(0, 4)
    c.ran(1, 3, failures=2)
    c.answered(1, 120.0)
    c.answered(1, 130.0)
    c.ran(2, 1)  # version 0 is forgotten: only the two newest are kept
    snap = c.snapshot()
    assert [t["version"] for t in snap] == [1, 2]
    assert snap[0]["requests"] == 3 and snap[0]["failures"] == 2
    assert latency.total(snap[0]["latency_ms_buckets"]) == 2
    ev = ReplicaStatusEvent(
        replica_id="r", model="m", version=1, state="serving", engine="transformers", started_ms=5, traffic=snap
    )
    assert decode(ReplicaStatusEvent, encode(ev)) == ev


def test_version_traffic_counter_keeps_a_stable_version_while_candidates_come_and_go() -> None:
    """The stable version keeps answering while newer candidates are tried and dropped:
    its counters stay (evicting the lowest version dropped them, and the next answer on
    it raised KeyError inside emit_generation, losing the generation event: CI, demo)."""
    c = VersionTrafficCounter(keep_versions=3)
    for candidate in range(16, 30):
        c.ran(15, 2)
        c.answered(15, 100.0)
        c.ran(candidate, 1)
        c.answered(candidate, 90.0)
    snap = {t["version"]: t for t in c.snapshot()}
    assert 15 in snap and len(snap) == 3
    assert snap[15]["requests"] == 28 and latency.total(snap[15]["latency_ms_buckets"]) == 14
    assert [t["version"] for t in c.snapshot()] == sorted(snap)  # oldest version first


# --- the pure rules ---------------------------------------------------------------------
def arm(requests: int = 100, failures: int = 0, p95: float = 100.0, latency_n: int = 100) -> ArmCounts:
    return ArmCounts(
        n=50,
        successes=25,
        tokens_sum=500,
        requests=requests,
        failures=failures,
        latency_n=latency_n,
        latency_p95_ms=p95,
    )


def test_error_guardrail() -> None:
    assert error_guardrail(arm(), arm(failures=2, requests=10), POLICY) is None  # fewer than min_errors
    reason = error_guardrail(arm(), arm(failures=3, requests=10), POLICY)
    assert reason is not None and "3 of the candidate's 10 requests failed" in reason
    # both arms failing alike is not the candidate's fault
    assert error_guardrail(arm(failures=30), arm(failures=33), POLICY) is None
    assert error_guardrail(arm(failures=30), arm(failures=36), POLICY) is not None


def test_latency_guardrail() -> None:
    # bound: 2 x 100 ms + 100 ms = 300 ms
    assert latency_guardrail(arm(p95=100.0), arm(p95=290.0), POLICY) is None
    reason = latency_guardrail(arm(p95=100.0), arm(p95=310.0), POLICY)
    assert reason is not None and "latency p95 310 ms" in reason and "300 ms" in reason
    assert latency_guardrail(arm(p95=100.0), arm(p95=5000.0, latency_n=19), POLICY) is None  # too few answers
    assert latency_guardrail(arm(p95=100.0, latency_n=0), arm(p95=5000.0), POLICY) is None


def test_guardrails_win_over_a_better_reward() -> None:
    stable = arm()
    stable.n, stable.successes = 500, 100
    for bad in (arm(failures=10), arm(p95=1000.0)):
        bad.n, bad.successes = 500, 450
        verdict = decide(stable, bad, POLICY)
        assert verdict.decision == RolloutDecision.ROLLBACK and verdict.reason.startswith("guardrail:")
    good = arm()
    good.n, good.successes = 500, 450
    assert decide(stable, good, POLICY).decision == RolloutDecision.PROMOTE


def test_new_arm_fields_round_trip() -> None:
    a = arm(failures=7, p95=123.5)
    encoded = encode_arms({"candidate": a})
    assert encoded["candidate.error_rate"] == pytest.approx(0.07)
    assert decode_arm(encoded, "candidate") == a


# --- the controller: replica reports into arms ------------------------------------------
def status(
    replica: str, started_ms: int, t: int, traffic: dict[int, tuple[int, int, list[float]]]
) -> ReplicaStatusEvent:
    return ReplicaStatusEvent(
        replica_id=replica,
        model="m",
        version=0,
        state="serving",
        engine="transformers",
        started_ms=started_ms,
        event_time_ms=t,
        traffic=[
            {"version": v, "requests": r, "failures": f, "latency_ms_buckets": histogram(lat)}
            for v, (r, f, lat) in traffic.items()
        ],
    )


def test_controller_counts_replica_traffic_since_the_rollout_started() -> None:
    ctl = RolloutController(POLICY, report_every_samples=10_000)
    # replica a served 0 before the rollout: 100 requests, 5 failed, all fast
    ctl.on_replica_status(status("a", 10, 500, {0: (100, 5, [50.0] * 95)}))
    start(ctl, 1, 0, t=1000)
    ctl.on_replica_status(status("a", 10, 1500, {0: (130, 5, [50.0] * 125), 1: (10, 0, [60.0] * 10)}))
    # replica b started after the rollout: everything it counted is in
    ctl.on_replica_status(status("b", 1200, 1600, {0: (20, 0, [40.0] * 20), 1: (12, 1, [70.0] * 11)}))
    r = ctl.rollouts["m"]
    s, c = r.arms["stable"], r.arms["candidate"]
    assert (s.requests, s.failures, s.latency_n) == (50, 0, 50)
    assert (c.requests, c.failures, c.latency_n) == (22, 1, 21)
    assert 40.0 <= s.latency_p95_ms <= 50.0 * latency.GROWTH
    # a restart of replica a (a new process) counts from zero, the old process's share stays
    ctl.on_replica_status(status("a", 1700, 1800, {1: (5, 0, [60.0] * 5)}))
    assert r.arms["candidate"].requests == 27
    assert ctl.tick(1900) == []  # nothing wrong yet


def test_failing_candidate_is_rolled_back_by_the_controller() -> None:
    ctl = RolloutController(POLICY, report_every_samples=10_000)
    start(ctl, 1, 0, t=1000)
    for i in range(40):  # the reward says the candidate is much better
        ctl.on_sample(sample(f"s{i}", 0, -1.0, t=2000))
        ctl.on_sample(sample(f"c{i}", 1, 1.0, t=2000))
    ctl.on_replica_status(status("a", 10, 2000, {0: (200, 0, [50.0] * 200), 1: (20, 6, [50.0] * 14)}))
    (ev,) = ctl.tick(2100)
    assert ev.decision == "rollback" and ev.candidate_version is None and ev.stable_version == 0
    assert "6 of the candidate's 20 requests failed" in ev.reason
    assert ev.arms["candidate.failures"] == 6 and ev.arms["candidate.error_rate"] == pytest.approx(0.3)
    shown = status_row(ev)["arms"]["candidate"]  # what `rlfeed rollout status` prints
    assert (shown["requests"], shown["failures"], shown["error_rate"]) == (20, 6, 0.3)


def test_slow_candidate_is_rolled_back_by_the_controller() -> None:
    ctl = RolloutController(POLICY, report_every_samples=10_000)
    start(ctl, 1, 0, t=1000)
    ctl.on_replica_status(status("a", 10, 1100, {0: (5, 0, [80.0] * 5)}))  # the baseline
    ctl.on_replica_status(status("a", 10, 2000, {0: (55, 0, [80.0] * 55), 1: (25, 0, [900.0] * 25)}))
    (ev,) = ctl.tick(2100)
    assert ev.decision == "rollback" and "latency p95" in ev.reason
    assert ev.arms["candidate.latency_p95_ms"] > 700


def test_old_replicas_without_counters_and_silent_ones_are_ignored() -> None:
    ctl = RolloutController(POLICY, report_every_samples=10_000)
    start(ctl, 1, 0, t=1000)
    old = ReplicaStatusEvent(replica_id="x", model="m", version=0, state="serving", engine="transformers")
    ctl.on_replica_status(old)
    assert ctl.replicas == {}
    ctl.on_replica_status(status("a", 10, 2000, {1: (10, 0, [])}))
    ctl.on_replica_status(status("b", 10, 2000 + 3_600_001, {1: (1, 0, [])}))
    assert set(ctl.replicas["m"]) == {("b", 10)}
    assert ctl.rollouts["m"].arms["candidate"].requests == 1


def test_a_replica_report_of_candidate_requests_opens_the_sample_window() -> None:
    ctl = RolloutController(POLICY, report_every_samples=10_000)
    start(ctl, 1, 0, t=1000)
    r = ctl.rollouts["m"]
    ctl.on_sample(sample("s-loading", 0, 1.0, t=1500))
    ctl.on_sample(sample("s-serving", 0, 1.0, t=1900))
    ctl.on_replica_status(status("a", 10, 1700, {0: (30, 0, [50.0] * 30)}))  # still loading the candidate
    assert r.serving_ms is None and len(r.held) == 2
    ctl.on_replica_status(status("a", 10, 1800, {0: (40, 0, [50.0] * 40), 1: (2, 0, [60.0] * 2)}))
    assert r.serving_ms == 1800 and len(r.held) == 1
    assert r.arms["stable"].n == 1  # the sample from before the candidate served is not counted
    ctl.on_replica_status(status("b", 10, 1850, {1: (1, 0, [60.0])}))  # a later replica moves nothing
    assert r.serving_ms == 1800


def test_candidate_status_interval_is_a_validated_setting() -> None:
    from pydantic import ValidationError

    from services.serving.settings import ServingSettings

    assert ServingSettings().candidate_status_interval_s == 2.0
    with pytest.raises(ValidationError, match="candidate_status_interval_s"):
        ServingSettings(candidate_status_interval_s=0)
