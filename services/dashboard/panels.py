"""Chart data for the page: run the named queries and shape their rows into series.

The shaping functions are pure (rows in, JSON-ready dicts out) so they are tested
without ClickHouse. `Store` wraps the dashboard's own ClickHouse client with a lock:
the HTTP server answers requests on several threads and the alert loop queries too,
and one clickhouse-connect client must not run two queries at once (see server.py).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from clickhouse_connect.driver.client import Client

from services.dashboard import queries
from services.dashboard.queries import BY_NAME, TENANT_BY_NAME

Row = Sequence[Any]


class Store:
    """The dashboard's ClickHouse client, one query at a time."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.lock = threading.Lock()

    def rows(self, sql: str, parameters: dict | None = None) -> list[tuple]:
        """All rows of one query."""
        with self.lock:
            return [tuple(r) for r in self.client.query(sql, parameters=parameters or {}).result_rows]

    def insert(self, table: str, rows: list[list], columns: list[str]) -> None:
        """Insert rows into one table."""
        if rows:
            with self.lock:
                self.client.insert(table, rows, column_names=columns)


def _num(v: Any) -> float | None:
    """A JSON-safe float (None for NaN, infinities and NULL)."""
    if v is None:
        return None
    if isinstance(v, datetime):
        return v.timestamp()
    f = float(v)
    return f if math.isfinite(f) else None


def pivot(rows: Sequence[Row], x: int, name: int | None, ys: dict[str, int], prefix: str = "") -> list[dict]:
    """Series from long rows: one series per distinct `row[name]` (or one per `ys` column).

    Points are `[x, y]` pairs sorted by x; rows with a missing y are left out.
    """
    series: dict[str, list] = {}
    for row in rows:
        for label, col in ys.items():
            key = f"{prefix}{row[name]}" if name is not None else label
            y = _num(row[col])
            if y is not None:
                series.setdefault(key, []).append([_num(row[x]), y])
    return [{"name": k, "points": sorted(v)} for k, v in series.items()]


def reward_panel(rows: Sequence[Row]) -> dict:
    return {"kind": "line", "x": "time", "series": pivot(rows, 0, 1, {"reward": 2})}


def accept_panel(rows: Sequence[Row]) -> dict:
    points = [
        {"x": int(r[0]), "y": _num(r[3]), "lo": _num(r[4]), "hi": _num(r[5]), "n": int(r[2]), "accepts": int(r[1])}
        for r in rows
    ]
    return {"kind": "interval", "x": "version", "points": points}


def _guarded(r: Row) -> str:
    """An arm's guardrail figures (requests, failed share, latency p95) for its note, if any."""
    if len(r) < 14 or not r[11]:
        return ""
    return f"; {int(r[11])} requests, {_num(r[12]) or 0:.1%} failed, p95 {_num(r[13]) or 0:.0f} ms"


def rollout_panel(rows: Sequence[Row]) -> dict:
    """The arms of each model's latest rollout event as interval points (x: version)."""
    points = [
        {
            "x": int(r[0]),
            "y": _num(r[3]),
            "lo": _num(r[4]),
            "hi": _num(r[5]),
            "n": int(r[2]),
            "accepts": int(r[1]),
            "note": f"{r[7]} {r[6]} ({r[8]}; log LR {_num(r[9]) or 0:.2f} / {_num(r[10]) or 0:.2f})" + _guarded(r),
        }
        for r in rows
    ]
    return {"kind": "interval", "x": "version", "points": points}


def stacked_panel(rows: Sequence[Row]) -> dict:
    return {"kind": "stacked", "x": "time", "series": pivot(rows, 0, 1, {"y": 2})}


def throughput_panel(rows: Sequence[Row]) -> dict:
    return {"kind": "line", "x": "time", "series": pivot(rows, 0, None, {"samples/s": 1, "generations/s": 2})}


def latency_panel(rows: Sequence[Row]) -> dict:
    return {"kind": "line", "x": "time", "series": pivot(rows, 0, None, {"p50": 1, "p95": 2, "p99": 3})}


def replica_panel(rows: Sequence[Row]) -> dict:
    bars = []
    targets = set()
    for model, replica, version, state, seen_at_s, target in rows:
        if target is not None:
            targets.add(int(target))
        bars.append(
            {
                "label": replica,
                "value": int(version),
                "note": f"{model} v{version} {state}",
                "ok": target is None or int(version) == int(target),
                "seen_at_s": _num(seen_at_s),
            }
        )
    refs = [{"label": f"latest v{t}", "y": t} for t in sorted(targets)]
    return {"kind": "hbar", "bars": bars, "refs": refs}


def lag_panel(rows: Sequence[Row], bound: int) -> dict:
    return {
        "kind": "line",
        "x": "time",
        "series": pivot(rows, 0, 1, {"lag": 2}),
        "refs": [{"label": f"alert bound {bound}", "y": bound}],
    }


def completion_panel(rows: Sequence[Row]) -> dict:
    length = pivot(rows, 0, None, {"mean tokens": 2, "p95 tokens": 4, "max tokens": 5})
    fractions = pivot(rows, 0, None, {"empty": 6, "truncated (max length)": 7, "distinct": 8})
    return {"kind": "line", "x": "version", "series": length, "series2": fractions, "unit2": "fraction"}


def trainer_panel(rows: Sequence[Row], kl_max: float) -> dict:
    kl = pivot([r for r in rows if r[1] == "kl_parent"], 0, 1, {"v": 2})
    other = pivot([r for r in rows if r[1] != "kl_parent"], 0, 1, {"v": 2})
    return {
        "kind": "line",
        "x": "version",
        "series": kl,
        "refs": [{"label": f"kl alert {kl_max}", "y": kl_max}],
        "series2": other,
        "unit2": "gate figure",
    }


def collect(store: Store, window_s: int, lag_bound: int, kl_max: float, tenant: str | None = None) -> dict:
    """Every panel's data for the last `window_s` seconds; with `tenant`, only that
    tenant's rows (queries.TENANT_PANELS) and no operator-only panel."""
    params: dict[str, Any] = {"window_s": int(window_s)}
    by_name = BY_NAME
    if tenant is not None:
        params["tenant"] = tenant
        by_name = TENANT_BY_NAME
    shapers = {
        "reward_by_version": reward_panel,
        "accept_rate_by_version": accept_panel,
        "rollout_arms": rollout_panel,
        "feedback_mix": stacked_panel,
        "throughput": throughput_panel,
        "latency": latency_panel,
        "replica_versions": replica_panel,
        "events_lost": stacked_panel,
        "dead_letters": stacked_panel,
        "consumer_lag": lambda rows: lag_panel(rows, lag_bound),
        "completion_by_version": completion_panel,
        "trainer_gate": lambda rows: trainer_panel(rows, kl_max),
    }
    panels = {}
    for name, shape in shapers.items():
        q = by_name.get(name)
        if q is None:
            continue
        try:
            data = shape(store.rows(q.for_page(), params if q.time_column or tenant is not None else None))
            data["error"] = None
        except Exception as exc:  # one broken panel must not blank the page
            data = {"kind": "error", "error": str(exc)[:300]}
        panels[name] = {"title": q.title, "unit": q.unit} | data
    return {"generated_at": time.time(), "window_s": window_s, "tenant": tenant, "panels": panels}


def recent_alerts(store: Store, limit: int = 50) -> list[dict]:
    """The latest rows of the alerts table, newest first."""
    cols = ("ts", "rule", "key", "status", "severity", "message", "value", "threshold")
    return [dict(zip(cols, r, strict=True)) for r in store.rows(queries.RECENT_ALERTS, {"limit": limit})]
