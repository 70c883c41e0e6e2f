"""The dashboard's HTTP server: `/` (the page), `/api/panels`, `/api/alerts`, `/health`,
and `POST /api/forget` (what `rlfeed forget` calls while the stack owns chdb).

Access: with no API key on file (the default; the page binds to loopback) every endpoint
is open. Once the key file holds a key (`rlfeed keys create --tenant T`), the data
endpoints need `Authorization: Bearer <key>` (or `X-API-Key`): a tenant's key gets only
that tenant's rows (queries.TENANT_PANELS, every query filtered by tenant_id), no
infrastructure panel and an empty alert list; an operator key (tenant
`dashboard_operator_tenant`) sees all and alone may read alerts and forget users. `/`
and `/health` carry no data and stay open.

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
from pathlib import Path

import orjson
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response

from services.apikeys import KeyStore
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


ALL_TENANTS = None
"""The viewer of an operator key (or of an open dashboard): every tenant."""


class Denied(Exception):
    """A request without the access it needs (401: no valid key, 403: not an operator)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def request_key(request: Request) -> str | None:
    """The API key a request carries (`Authorization: Bearer` or `X-API-Key`)."""
    auth = request.headers.get("authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    return request.headers.get("x-api-key") or None


def viewer_of(keys: KeyStore | None, key: str | None, operator_tenant: str) -> str | None:
    """The tenant whose rows a request may see; ALL_TENANTS (None) for an operator key or
    when no key is on file; Denied(401) for a missing or invalid key."""
    if keys is None:
        return ALL_TENANTS
    if len(keys) == 0:
        keys.reload()  # the first key may have been created since (an empty file is cheap to re-read)
        if len(keys) == 0:
            return ALL_TENANTS
    if not key:
        raise Denied(401, "missing API key: send `Authorization: Bearer <key>`")
    tenant = keys.tenant_of(key)
    if tenant is None:
        raise Denied(401, "invalid API key")
    return ALL_TENANTS if tenant == operator_tenant else tenant


def keys_path(settings: DashboardSettings) -> Path:
    """The API key file the dashboard checks keys against."""
    return settings.keys_file if settings.keys_file is not None else settings.home_dir / "gateway-keys.json"


def build_app(store: Store, monitor: Monitor, settings: DashboardSettings, keys: KeyStore | None = None) -> FastAPI:
    """The FastAPI app over one store and monitor; `keys`: the API key store (None: open)."""
    app = FastAPI(title="rlfeed dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    html = page_html(settings.dashboard_refresh_s)

    def viewer(request: Request, operator: bool = False) -> str | None:
        tenant = viewer_of(keys, request_key(request), settings.dashboard_operator_tenant)
        if operator and tenant is not ALL_TENANTS:
            raise Denied(403, "an operator key is required")
        return tenant

    @app.exception_handler(Denied)
    async def denied(request: Request, exc: Denied) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return Response(
            orjson.dumps({"error": {"message": str(exc), "field": "Authorization", "type": "authentication_error"}}),
            status_code=exc.status,
            media_type="application/json",
            headers=headers,
        )

    @app.get("/", response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(html)

    @app.get("/api/panels")
    def api_panels(request: Request, window_s: int | None = None) -> Response:
        tenant = viewer(request)
        window = max(60, min(window_s or settings.dashboard_window_s, 90 * 86400))
        return _json(panels.collect(store, window, settings.lag_alert_max_messages, settings.kl_alert_max, tenant))

    @app.get("/api/alerts")
    def api_alerts(request: Request) -> Response:
        if viewer(request) is not ALL_TENANTS:
            # alerts are about the shared loop (all tenants' figures): an empty list, so the page still loads
            note = "alerts are shown to operator keys only"
            return _json({"firing": [], "last_round": {}, "recent": [], "error": note})
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

    @app.post("/api/forget")
    async def api_forget(request: Request) -> Response:
        viewer(request, operator=True)
        try:
            body = orjson.loads(await request.body())
            tenant_id, user_id = body.get("tenant_id", "default"), body["user_id"]
            if not (isinstance(tenant_id, str) and isinstance(user_id, str) and tenant_id and user_id):
                raise ValueError("tenant_id and user_id must be non-empty strings")
        except (orjson.JSONDecodeError, KeyError, ValueError, AttributeError) as exc:
            return _json({"error": {"message": f"user_id: {exc}", "field": "user_id"}}, status=422)
        import asyncio

        from services.privacy.forget import delete_user

        def run() -> dict[str, int]:
            with store.lock:
                return delete_user(store.client, tenant_id, user_id)

        deleted = await asyncio.to_thread(run)
        event(log, "user_forgotten", tenant_id=tenant_id, rows=sum(deleted.values()))
        return _json({"tenant_id": tenant_id, "user_id": user_id, "deleted": deleted})

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
        keys = KeyStore(keys_path(settings))
        self.server = DashboardServer(
            build_app(self.store, self.monitor, settings, keys), settings.dashboard_host, settings.dashboard_port
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
