"""The dashboard's HTTP server: `/` (the page), `/api/panels`, `/api/alerts`, `/health`.

It runs uvicorn in a thread of the process that owns ClickHouse (chdb locks its data
directory to one process, and cannot listen on HTTP itself).

Thread safety, as found in clickhouse-connect 1.12: the chdb backend gives each client
its own engine handle and serializes calls on it with a per-client lock, so sharing a
client would be safe but would queue page queries behind the sink's inserts; the HTTP
client keeps one session id per client and raises "concurrent queries within the same
session" when two threads use it. So the dashboard opens its own client (for chdb a
second handle on the same engine) and `panels.Store` serializes the dashboard's own
threads (request handlers and the alert loop) on it with a lock.
"""

from __future__ import annotations

import logging
import threading
import time
from importlib import resources

import orjson
import uvicorn
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from services.dashboard import panels
from services.dashboard.monitor import Monitor
from services.dashboard.panels import Store
from services.dashboard.settings import DashboardSettings
from services.logs import event

log = logging.getLogger("rlfeed.dashboard")


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data, default=str), status_code=status, media_type="application/json")


def page_html(refresh_s: float) -> str:
    """The page, with its refresh period filled in."""
    html = resources.files("services.dashboard").joinpath("page.html").read_text()
    return html.replace("__REFRESH_MS__", str(int(refresh_s * 1000)))


def build_app(store: Store, monitor: Monitor, settings: DashboardSettings) -> FastAPI:
    """The FastAPI app over one store and monitor."""
    app = FastAPI(title="rlfeed dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    html = page_html(settings.dashboard_refresh_s)

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/api/panels")
    def api_panels(window_s: int | None = None) -> Response:
        window = max(60, min(window_s or settings.dashboard_window_s, 90 * 86400))
        return _json(panels.collect(store, window, settings.lag_alert_max_messages, settings.kl_alert_max))

    @app.get("/api/alerts")
    def api_alerts() -> Response:
        try:
            recent, error = panels.recent_alerts(store), None
        except Exception as exc:
            recent, error = [], str(exc)[:300]
        return _json(
            {
                "firing": [a.as_dict() for a in monitor.firing],
                "last_round": monitor.last_round,
                "recent": recent,
                "error": error,
            }
        )

    @app.get("/health")
    def health() -> Response:
        try:
            store.rows("SELECT 1")
            return _json({"ok": True, "last_round_at": monitor.last_round.get("at")})
        except Exception as exc:
            return _json({"ok": False, "error": str(exc)[:300]}, status=503)

    return app


class DashboardServer:
    """uvicorn serving the app from a daemon thread; `start()` waits until it listens."""

    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="dashboard", daemon=True)
        self.host = host

    @property
    def port(self) -> int:
        """The bound port (the real one when 0 was asked for)."""
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self, timeout_s: float = 15.0) -> DashboardServer:
        """Start serving; raise when the server is not up within `timeout_s`."""
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"dashboard did not start on {self.host} (port in use?)")
            time.sleep(0.05)
        event(log, "dashboard_started", url=self.url)
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)


class StackDashboard:
    """The dashboard as the stack runs it: its own ClickHouse client, the alert loop, the server."""

    def __init__(self, settings: DashboardSettings, clickhouse_url: str, bootstrap: str | None) -> None:
        from services.clickhouse.client import connect

        self.store = Store(connect(clickhouse_url))
        self.monitor = Monitor(self.store, settings, bootstrap)
        self.server = DashboardServer(
            build_app(self.store, self.monitor, settings), settings.dashboard_host, settings.dashboard_port
        )
        self.loop: threading.Thread | None = None

    def start(self, stop: threading.Event) -> str:
        """Serve the page and start the alert loop (until `stop`); return the page's URL."""
        self.server.start()
        self.loop = threading.Thread(target=self.monitor.run, args=(stop,), name="alerts", daemon=True)
        self.loop.start()
        return self.server.url

    def stop(self) -> None:
        self.server.stop()
        if self.loop is not None:
            self.loop.join(30)
