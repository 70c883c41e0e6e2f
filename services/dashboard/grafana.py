"""Grafana dashboard JSON built from the same named queries as the page.

`python -m services.dashboard.grafana` rewrites `ops/grafana/dashboards/rlfeed.json`;
a test checks the committed file matches, so the page and Grafana cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.dashboard.queries import PANELS, NamedQuery

DATASOURCE = {"type": "grafana-clickhouse-datasource", "uid": "rlfeed-clickhouse"}
OUTPUT = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "dashboards" / "rlfeed.json"
FORMAT_TIMESERIES, FORMAT_TABLE = 0, 1
_VIZ = {
    "reward_by_version": "timeseries",
    "accept_rate_by_version": "barchart",
    "feedback_mix": "timeseries",
    "throughput": "timeseries",
    "latency": "timeseries",
    "replica_versions": "bargauge",
    "events_lost": "timeseries",
    "dead_letters": "timeseries",
    "consumer_lag": "timeseries",
    "completion_by_version": "barchart",
    "trainer_gate": "table",
}
_STACKED = {"feedback_mix", "events_lost", "dead_letters"}


def panel(q: NamedQuery, i: int) -> dict:
    """One Grafana panel for one named query, laid out two per row."""
    viz = _VIZ.get(q.name, "table")
    timeseries = viz == "timeseries"
    out: dict = {
        "id": i + 1,
        "title": q.title,
        "type": viz,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
        "targets": [
            {
                "datasource": DATASOURCE,
                "refId": "A",
                "editorType": "sql",
                "queryType": "timeseries" if timeseries else "table",
                "format": FORMAT_TIMESERIES if timeseries else FORMAT_TABLE,
                "rawSql": q.for_grafana(),
            }
        ],
        "fieldConfig": {"defaults": {"unit": "none"}, "overrides": []},
        "options": {},
    }
    if viz == "timeseries" and q.name in _STACKED:
        out["fieldConfig"]["defaults"]["custom"] = {"drawStyle": "bars", "stacking": {"mode": "normal"}}
    return out


def dashboard() -> dict:
    """The whole dashboard (schema of Grafana 10/11)."""
    return {
        "uid": "rlfeed",
        "title": "rlfeed",
        "tags": ["rlfeed"],
        "timezone": "browser",
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "editable": True,
        "panels": [panel(q, i) for i, q in enumerate(PANELS)],
        "annotations": {
            "list": [
                {
                    "name": "alerts",
                    "datasource": DATASOURCE,
                    "enable": True,
                    "iconColor": "red",
                    "target": {
                        "editorType": "sql",
                        "format": FORMAT_TABLE,
                        "rawSql": "SELECT ts AS time, concat('[', rule, '] ', status, ': ', message) AS text "
                        "FROM alerts WHERE $__timeFilter(ts) ORDER BY ts",
                    },
                }
            ]
        },
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(OUTPUT)
