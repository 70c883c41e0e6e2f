"""The rollout_arms view (migrations 0003, 0006) and the dashboard's rollout panel over it (chdb)."""

from __future__ import annotations

from services.dashboard.panels import rollout_panel
from services.dashboard.queries import BY_NAME
from services.sink.rows import SPECS
from streams.rollout import RolloutController, policy_from_settings
from streams.settings import StreamsSettings
from tests.test_rollout_guardrails import status
from tests.test_rollout_units import sample, update


def test_rollout_arms_view_and_panel(clickhouse) -> None:
    ctl = RolloutController(policy_from_settings(StreamsSettings()), report_every_samples=10)
    (start,) = ctl.on_model_update(update(1, 0), 1000)
    ctl.adopt(start)
    for i in range(40):
        ctl.on_sample(sample(f"s{i}", 0, 1.0 if i % 2 else -1.0))
        ctl.on_sample(sample(f"c{i}", 1, 1.0 if i % 4 else -1.0))
    ctl.on_replica_status(status("r", 1500, 1900, {0: (60, 0, [50.0] * 60), 1: (40, 1, [60.0] * 39)}))
    (report,) = ctl.tick(2000)
    spec = SPECS["rollouts.v1"]
    rows = [spec.as_dict(e) for e in (start, report)]
    clickhouse.insert(spec.table, [list(r.values()) for r in rows], column_names=list(rows[0]))
    got = clickhouse.query(
        "SELECT arm, version, n, successes, rate_low, rate, rate_high FROM rollout_arms "
        "WHERE decision = 'collect' AND n > 0 ORDER BY arm"
    ).result_rows
    assert [(r[0], r[1], r[2], r[3]) for r in got] == [("candidate", 1, 40, 30), ("stable", 0, 40, 20)]
    assert all(r[4] < r[5] < r[6] for r in got)
    guard = clickhouse.query(
        "SELECT arm, requests, failures, error_rate, latency_n, latency_p95_ms FROM rollout_arms "
        "WHERE decision = 'collect' AND n > 0 ORDER BY arm"
    ).result_rows
    assert [r[:3] for r in guard] == [("candidate", 40, 1), ("stable", 60, 0)]
    assert guard[0][3] == 1 / 40 and [r[4] for r in guard] == [39, 60]
    assert 48.0 <= guard[1][5] <= 50.0 * 1.25 and 48.0 <= guard[0][5] <= 60.0 * 1.25
    panel = rollout_panel(clickhouse.query(BY_NAME["rollout_arms"].for_page()).result_rows)
    assert [(p["x"], p["n"]) for p in panel["points"]] == [(0, 40), (1, 40)]
    assert "40 requests, 2.5% failed, p95" in panel["points"][1]["note"]
