"""The rollout_arms view (migration 0003) and the dashboard's rollout panel over it (chdb)."""

from __future__ import annotations

from services.dashboard.panels import rollout_panel
from services.dashboard.queries import BY_NAME
from services.sink.rows import SPECS
from streams.rollout import RolloutController, policy_from_settings
from streams.settings import StreamsSettings
from tests.test_rollout_units import sample, update


def test_rollout_arms_view_and_panel(clickhouse) -> None:
    ctl = RolloutController(policy_from_settings(StreamsSettings()), report_every_samples=10)
    (start,) = ctl.on_model_update(update(1, 0), 1000)
    ctl.adopt(start)
    for i in range(40):
        ctl.on_sample(sample(f"s{i}", 0, 1.0 if i % 2 else -1.0))
        ctl.on_sample(sample(f"c{i}", 1, 1.0 if i % 4 else -1.0))
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
    panel = rollout_panel(clickhouse.query(BY_NAME["rollout_arms"].for_page()).result_rows)
    assert [(p["x"], p["n"]) for p in panel["points"]] == [(0, 40), (1, 40)]
