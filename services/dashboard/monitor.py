"""The alert loop of the stack process: probe consumer lag, run the rules, record alerts.

Every `alert_interval_s`:
  1. Probe consumer lag (when a broker is known) and insert it into `consumer_lag`.
  2. Read the rules' inputs from the rollups (`queries.ALERT_*`).
  3. Evaluate the rules (pure, alerts.py) and diff against the previous round.
  4. For each alert that started or resolved: one row in `alerts` and one JSON log line.
A failing round is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime

import orjson

from services.dashboard import queries
from services.dashboard.alerts import (
    Alert,
    AlertInputs,
    LagRow,
    LatestUpdate,
    ReplicaDrops,
    ReplicaRow,
    Tracker,
    VersionMetric,
    VersionReward,
    evaluate,
)
from services.dashboard.lag import LagProbe
from services.dashboard.panels import Store
from services.dashboard.settings import DashboardSettings
from services.dashboard.stats import Moments
from services.logs import event

log = logging.getLogger("rlfeed.dashboard.alerts")
ALERT_COLUMNS = ["ts", "rule", "key", "status", "severity", "message", "value", "threshold", "details"]
LAG_COLUMNS = ["ts", "consumer_group", "topic", "partition", "committed", "high_watermark", "lag"]


def gather(store: Store, s: DashboardSettings, lag: list[LagRow], now_s: float) -> AlertInputs:
    """Read every rule input from ClickHouse."""
    rewards = [
        VersionReward(model, int(v), None if parent is None else int(parent), Moments(int(n), float(t), float(t2)))
        for model, v, n, t, t2, parent in store.rows(queries.ALERT_VERSION_REWARDS)
    ]
    kl = [VersionMetric(m, int(v), float(x)) for m, v, x in store.rows(queries.ALERT_KL)]
    ((recent, baseline),) = store.rows(
        queries.ALERT_DEAD_LETTERS, {"recent_s": s.dlq_window_s, "baseline_s": s.dlq_baseline_s}
    ) or [(0, 0)]
    latest = [LatestUpdate(m, int(v), float(at)) for m, v, at in store.rows(queries.ALERT_LATEST_UPDATES)]
    replicas = [ReplicaRow(m, r, int(v), st, float(at)) for m, r, v, st, at in store.rows(queries.ALERT_REPLICAS)]
    drops = [
        ReplicaDrops(m, r, {k: int(n) for k, n in first.items()}, {k: int(n) for k, n in last.items()})
        for m, r, first, last in store.rows(queries.ALERT_REPLICA_DROPS, {"window_s": s.replica_drop_window_s})
    ]
    return AlertInputs(now_s, rewards, kl, int(recent or 0), int(baseline or 0), lag, latest, replicas, drops)


class Monitor:
    """Runs the rounds; `firing` and `last_round` are read by the HTTP server."""

    def __init__(self, store: Store, settings: DashboardSettings, bootstrap: str | None = None) -> None:
        self.store = store
        self.settings = settings
        self.bootstrap = bootstrap
        self.tracker = Tracker()
        self.last_round: dict = {"at": None, "error": None, "lag": []}
        self._probe: LagProbe | None = None

    @property
    def firing(self) -> list[Alert]:
        return list(self.tracker.firing.values())

    def round(self) -> list[Alert]:
        """One evaluation (steps 1-4 above); return the alerts firing now."""
        now_s = time.time()
        lag: list[LagRow] = []
        if self.bootstrap:
            if self._probe is None:
                self._probe = LagProbe(self.bootstrap, self.settings.lag_groups)
            lag = self._probe.probe()
            ts = datetime.fromtimestamp(now_s, tz=UTC)
            self.store.insert(
                "consumer_lag",
                [[ts, r.group, r.topic, r.partition, r.committed, r.high_watermark, r.lag] for r in lag],
                LAG_COLUMNS,
            )
        alerts = evaluate(gather(self.store, self.settings, lag, now_s), self.settings)
        started, resolved = self.tracker.update(alerts)
        self._record(started, "firing", now_s)
        self._record(resolved, "resolved", now_s)
        self.last_round = {
            "at": now_s,
            "error": None,
            "lag": [{"group": r.group, "topic": r.topic, "partition": r.partition, "lag": r.lag} for r in lag],
        }
        return alerts

    def _record(self, alerts: list[Alert], status: str, now_s: float) -> None:
        ts = datetime.fromtimestamp(now_s, tz=UTC)
        rows = []
        for a in alerts:
            level = logging.WARNING if status == "firing" else logging.INFO
            event(log, f"alert_{status}", level, **a.as_dict())
            details = orjson.dumps(a.details, default=str).decode()
            rows.append([ts, a.rule, a.key, status, a.severity, a.message, a.value, a.threshold, details])
        self.store.insert("alerts", rows, ALERT_COLUMNS)

    def run(self, stop: threading.Event) -> None:
        """Rounds every alert_interval_s until `stop` is set."""
        while True:
            try:
                self.round()
            except Exception as exc:
                self.last_round = self.last_round | {"at": time.time(), "error": str(exc)[:300]}
                event(log, "alert_round_failed", logging.WARNING, error=str(exc)[:500])
            if stop.wait(self.settings.alert_interval_s):
                break
        self.close()

    def close(self) -> None:
        """Close the lag probe's Kafka clients."""
        if self._probe is not None:
            self._probe.close()
            self._probe = None
