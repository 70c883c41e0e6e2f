"""Unit tests of the dashboard's pure parts: statistics, alert rules, panel shaping, query rendering."""

from __future__ import annotations

import json
import random

import pytest

from services.dashboard import grafana, panels
from services.dashboard.alerts import (
    AlertInputs,
    LagRow,
    LatestUpdate,
    ReplicaDrops,
    ReplicaRow,
    Tracker,
    VersionMetric,
    VersionReward,
    dead_letter_spike,
    dropping_replicas,
    evaluate,
    kl_spikes,
    lag_over_bound,
    reward_regressions,
    stuck_replicas,
)
from services.dashboard.queries import BY_NAME, PANELS
from services.dashboard.settings import DashboardSettings
from services.dashboard.stats import Moments, normal_sf, welch_t, wilson_interval


def moments(values: list[float]) -> Moments:
    return Moments(len(values), sum(values), sum(v * v for v in values))


def draws(mean: float, n: int, seed: int, sd: float = 0.5) -> list[float]:
    rng = random.Random(seed)
    return [rng.gauss(mean, sd) for _ in range(n)]


def test_moments_and_welch_match_textbook() -> None:
    a, b = moments([1.0, 2.0, 3.0, 4.0]), moments([2.0, 4.0, 6.0])
    assert a.mean == 2.5 and a.variance == pytest.approx(5 / 3)
    # Welch t by hand: (2.5 - 4) / sqrt(5/3/4 + 4/3)
    assert welch_t(a, b) == pytest.approx(-1.5 / (5 / 12 + 4 / 3) ** 0.5)
    assert welch_t(moments([1.0]), b) == 0.0
    assert normal_sf(0) == pytest.approx(0.5) and normal_sf(3) == pytest.approx(0.00135, abs=1e-5)


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(0, 0) == (0.0, 1.0)


def rewards(parent_mean: float, child_mean: float, n: int = 200) -> list[VersionReward]:
    return [
        VersionReward("m", 1, 0, moments(draws(parent_mean, n, 1))),
        VersionReward("m", 2, 1, moments(draws(child_mean, n, 2))),
    ]


def test_reward_regression_fires_only_on_a_significant_drop() -> None:
    fired = reward_regressions(rewards(0.5, 0.2), t_max=3.0, min_samples=30)
    assert [a.key for a in fired] == ["m/v2"]
    assert fired[0].value <= -3.0 and fired[0].details["p_one_sided"] < 0.0014
    assert reward_regressions(rewards(0.5, 0.48), 3.0, 30) == []  # within noise
    assert reward_regressions(rewards(0.2, 0.5), 3.0, 30) == []  # an improvement
    assert reward_regressions(rewards(0.5, 0.2, n=10), 3.0, 30) == []  # too few samples
    orphan = [VersionReward("m", 2, 7, moments(draws(0.0, 100, 3)))]
    assert reward_regressions(orphan, 3.0, 30) == []


def test_kl_spike_absolute_and_relative() -> None:
    seq = [VersionMetric("m", v, x) for v, x in enumerate([0.01, 0.012, 0.011, 0.05, 0.6], start=1)]
    fired = {a.key: a for a in kl_spikes(seq, kl_max=0.5, factor=3.0, floor=0.02, history=5)}
    assert set(fired) == {"m/v4", "m/v5"}
    assert fired["m/v5"].threshold == 0.5
    assert fired["m/v4"].threshold == pytest.approx(3 * 0.011)
    # Below the floor nothing is a spike, however large the ratio.
    tiny = [VersionMetric("m", 1, 0.001), VersionMetric("m", 2, 0.015)]
    assert kl_spikes(tiny, 0.5, 3.0, 0.02, 5) == []


def test_dead_letter_spike() -> None:
    assert dead_letter_spike(30, 0, 300, 3600, 20, 5.0)[0].rule == "dead_letter_spike"
    assert dead_letter_spike(10, 0, 300, 3600, 20, 5.0) == []  # too few
    # 30 in 5 min vs a steady 60/h baseline (5/5 min): 6x -> fires; vs 120/h: 3x -> does not.
    assert dead_letter_spike(30, 60 * 12, 300, 3600 * 12, 20, 5.0)
    assert dead_letter_spike(30, 360, 300, 3600, 20, 5.0) == []


def test_lag_over_bound_sums_partitions() -> None:
    rows = [LagRow("g", "t", 0, 10, 600), LagRow("g", "t", 1, 0, 500), LagRow("h", "t", 0, 5, 5)]
    assert rows[2].lag == 0 and LagRow("g", "t", 0, 9, 3).lag == 0
    fired = lag_over_bound(rows, 1000)
    assert [(a.key, a.value) for a in fired] == [("g/t", 1090.0)]
    assert lag_over_bound(rows, 1090) == []


def test_stuck_replicas() -> None:
    latest = [LatestUpdate("m", 3, published_at_s=1000.0)]
    replicas = [
        ReplicaRow("m", "fresh", 3, "serving", 1190.0),
        ReplicaRow("m", "stuck", 2, "serving", 1190.0),
        ReplicaRow("m", "stopped", 2, "stopped", 1190.0),
        ReplicaRow("m", "gone", 2, "serving", 100.0),
        ReplicaRow("other", "x", 1, "serving", 1190.0),
    ]
    assert [a.key for a in stuck_replicas(latest, replicas, 1200.0, 120.0, 600.0)] == ["m/stuck"]
    assert stuck_replicas(latest, replicas, 1100.0, 120.0, 600.0) == []  # still within the grace period
    # A rollback to v2 makes v2 the target: the v3 replica is the stuck one.
    rollback = [LatestUpdate("m", 2, published_at_s=1000.0)]
    assert [a.key for a in stuck_replicas(rollback, replicas, 1200.0, 120.0, 600.0)] == ["m/fresh"]


def test_dropping_replicas() -> None:
    rows = [
        ReplicaDrops("m", "quiet", {"buffer_full": 4}, {"buffer_full": 4}),
        ReplicaDrops("m", "losing", {"buffer_full": 4}, {"buffer_full": 9, "error": 1}),
        ReplicaDrops("m", "restarted", {"buffer_full": 40}, {"buffer_full": 3}),
    ]
    fired = dropping_replicas(rows, min_events=1)
    assert [(a.key, a.value, a.details["by_reason"]) for a in fired] == [
        ("m/losing", 6.0, {"buffer_full": 5, "error": 1}),
        ("m/restarted", 3.0, {"buffer_full": 3}),  # counts from zero after a restart
    ]
    assert [a.key for a in dropping_replicas(rows, min_events=5)] == ["m/losing"]
    assert dropping_replicas(rows, min_events=7) == []


def test_evaluate_and_tracker_transitions() -> None:
    s = DashboardSettings()
    inputs = AlertInputs(now_s=2000.0, rewards=rewards(0.5, 0.1), lag=[LagRow("g", "t", 0, 0, 20_000)])
    alerts = evaluate(inputs, s)
    assert [a.rule for a in alerts] == ["consumer_lag", "reward_regression"]
    tracker = Tracker()
    started, resolved = tracker.update(alerts)
    assert len(started) == 2 and resolved == []
    assert tracker.update(alerts) == ([], [])
    started, resolved = tracker.update(alerts[:1])
    assert started == [] and [a.rule for a in resolved] == ["reward_regression"]


def test_pivot_and_panel_shapes() -> None:
    rows = [(120, "thumb", 3), (60, "thumb", 1), (60, "accept", 2), (180, "copy", None)]
    series = {s["name"]: s["points"] for s in panels.pivot(rows, 0, 1, {"y": 2})}
    assert series == {"thumb": [[60.0, 1.0], [120.0, 3.0]], "accept": [[60.0, 2.0]]}
    wide = panels.latency_panel([(60, 10.0, 20.0, float("nan"), 5)])
    assert {s["name"]: s["points"] for s in wide["series"]} == {"p50": [[60.0, 10.0]], "p95": [[60.0, 20.0]]}
    replicas = panels.replica_panel([("m", "a", 3, "serving", 1.0, 3), ("m", "b", 2, "loading", 1.0, 3)])
    assert [b["ok"] for b in replicas["bars"]] == [True, False] and replicas["refs"][0]["y"] == 3
    accept = panels.accept_panel([(1, 30, 60, 0.5, 0.38, 0.62)])
    assert accept["points"][0] == {"x": 1, "y": 0.5, "lo": 0.38, "hi": 0.62, "n": 60, "accepts": 30}


def test_queries_render_for_page_and_grafana() -> None:
    for q in PANELS:
        page, graf = q.for_page(), q.for_grafana()
        assert "{time_filter}" not in page and "{time_filter}" not in graf
        if q.time_column:
            assert "{window_s:UInt32}" in page and f"$__timeFilter({q.time_column})" in graf
    assert "3.8416" in BY_NAME["accept_rate_by_version"].sql


def test_grafana_dashboard_is_up_to_date() -> None:
    """ops/grafana/dashboards/rlfeed.json is generated: `python -m services.dashboard.grafana`."""
    assert grafana.OUTPUT.read_text() == grafana.render()
    board = json.loads(grafana.render())
    assert len(board["panels"]) == len(PANELS)
    assert all(p["targets"][0]["datasource"]["uid"] == "rlfeed-clickhouse" for p in board["panels"])
