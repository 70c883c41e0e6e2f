"""Run the embedded stack until Ctrl-C: broker, topics, ClickHouse migrations, sink.

Start-up order: broker (or the one at RLFEED_KAFKA_URL) → topics → ClickHouse
(chdb under home_dir, or RLFEED_CLICKHOUSE_URL) with migrations → sink thread →
dashboard page and alert loop (services/dashboard) → state file. Shutdown runs it
backwards: the sink finishes its batch and leaves the group, then the broker stops.
A first Ctrl-C stops cleanly; a second one exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

from services.clickhouse import migrations
from services.clickhouse.client import connect
from services.kafka.embedded import EmbeddedBroker, read_state
from services.kafka.topics import ensure_topics
from services.kafka.url import bootstrap_servers
from services.logs import event
from services.sink.worker import Sink
from services.stack import state
from services.stack.settings import StackSettings

log = logging.getLogger("rlfeed.stack")


def _install_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        if stop.is_set():
            os._exit(130)
        print("\nstopping (Ctrl-C again to force)", file=sys.stderr)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def run(settings: StackSettings, stop: threading.Event | None = None) -> None:
    """Bring the stack up, print where everything is, and serve until `stop` (or a signal)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        _install_signals(stop)
    started = time.monotonic()
    home = settings.home_dir.resolve()
    broker = None
    if settings.kafka_url:
        bootstrap = bootstrap_servers(settings.kafka_url)
    else:
        if read_state(home) is not None:
            raise SystemExit(f"an embedded broker already runs for {home} (see `rlfeed status`)")
        broker = EmbeddedBroker(home / "broker", settings.embedded_kafka_port, state_dir=home)
        broker.start(settings.startup_timeout_s)
        bootstrap = broker.bootstrap
    sink = None
    sink_thread = None
    dashboard = None
    try:
        created = ensure_topics(bootstrap, settings.topic_prefix)
        ch_url = settings.clickhouse_url or settings.embedded_clickhouse_url
        client = connect(ch_url)
        applied = migrations.apply(client)
        if settings.sink_group_instance_id is None:
            # One stack per home dir: a stable member id lets a restarted stack take its
            # partitions back at once after a crash.
            settings = settings.model_copy(update={"sink_group_instance_id": f"stack-{home.name}"})
        sink = Sink(settings, bootstrap, client)
        sink_thread = threading.Thread(target=sink.run, args=(stop,), name="sink", daemon=True)
        sink_thread.start()
        dashboard, dashboard_url = _start_dashboard(settings, ch_url, bootstrap, stop)
        ready_s = time.monotonic() - started
        info = {
            "pid": os.getpid(),
            "kafka_url": f"kafka://{bootstrap}",
            "embedded_broker": broker is not None,
            "clickhouse_url": ch_url,
            "topic_prefix": settings.topic_prefix,
            "topics_created": created,
            "migrations_applied": applied,
            "ready_s": round(ready_s, 2),
            "model_dir": str(settings.default_model_dir.resolve()),
            "dashboard_url": dashboard_url,
        }
        event(log, "stack_ready", **info)
        print(_banner(info), file=sys.stderr)
        while not stop.wait(settings.status_interval_s if settings.status_interval_s > 0 else None):
            _report(home, info, sink, client)
        _report(home, info, sink, client)
    finally:
        stop.set()
        if dashboard is not None:
            dashboard.stop()
        if sink_thread is not None:
            sink_thread.join(30)
        if sink is not None:
            sink.close()
        if broker is not None:
            broker.stop()
        state.clear(home)
        event(log, "stack_stopped")


def _start_dashboard(
    settings: StackSettings, ch_url: str, bootstrap: str, stop: threading.Event
) -> tuple[object | None, str | None]:
    """The dashboard and alert loop, on their own ClickHouse client; (None, None) when off or failing."""
    if not settings.dashboard_enabled:
        return None, None
    from services.dashboard.server import StackDashboard

    try:
        dashboard = StackDashboard(settings, ch_url, bootstrap)
        return dashboard, dashboard.start(stop)
    except Exception as exc:  # the stack is useful without its page (e.g. the port is taken)
        event(log, "dashboard_failed", logging.WARNING, port=settings.dashboard_port, error=str(exc)[:300])
        return None, None


def _report(home, info: dict, sink: Sink, client) -> None:
    counts = {}
    for table in ("generations", "feedback", "samples", "model_updates", "dead_letters"):
        try:
            counts[table] = int(client.command(f"SELECT count() FROM {table} FINAL"))
        except Exception as exc:
            counts[table] = f"unavailable: {exc}"[:80]
    snapshot = info | {"updated_at": time.time(), "sink": sink.stats.as_dict(), "clickhouse_rows": counts}
    state.write(home, snapshot)
    event(log, "stack_status", sink_messages=sink.stats.messages, dead_letters=sink.stats.dead_letters, rows=counts)


def _banner(info: dict) -> str:
    broker = "embedded noida-db" if info["embedded_broker"] else "external"
    return (
        f"\nrlfeed stack is up in {info['ready_s']} s\n"
        f"  Kafka       {info['kafka_url']}  ({broker})\n"
        f"  ClickHouse  {info['clickhouse_url']}\n"
        f"  model dir   {info['model_dir']}\n"
        f"  dashboard   {info['dashboard_url'] or 'off'}\n"
        f"  other shells: export RLFEED_KAFKA_URL={info['kafka_url']}\n"
        f"  `rlfeed status` and `rlfeed topics` show what runs; Ctrl-C stops.\n"
    )
