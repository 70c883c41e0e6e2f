"""Running the gateway: broker resolution, socket, uvicorn.

`run_forever` is what `rlfeed gateway` runs (uvicorn in the main thread; SIGINT/SIGTERM stop
it gracefully, in-flight requests finish and the producer flushes). `GatewayServer` runs
the same server in a background thread, for tests and benchmarks.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from services.gateway.settings import GatewaySettings
from services.listen import bind_socket
from services.logs import event as log_event

log = logging.getLogger(__name__)


class NoBroker(RuntimeError):
    """Neither RLFEED_KAFKA_URL nor a running embedded broker."""


def resolve_bootstrap(settings: GatewaySettings) -> str:
    """kafka_url's bootstrap list, else the embedded broker's, else NoBroker."""
    from services.kafka.embedded import find_bootstrap

    bootstrap = find_bootstrap(settings.kafka_url, settings.home_dir)
    if bootstrap is not None:
        return bootstrap
    raise NoBroker(
        f"no broker: set RLFEED_KAFKA_URL=kafka://host:port or start the embedded stack (`rlfeed up`) "
        f"with home_dir {settings.home_dir.resolve()}"
    )


def _uvicorn_server(app: Any, settings: GatewaySettings) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.produce_timeout_s) + 5,
        log_level=settings.log_level.lower(),
        # Bodies are bounded by the gateway itself; keep h11's buffer bound above it.
        h11_max_incomplete_event_size=max(65_536, min(settings.max_request_bytes, 1 << 20)),
    )
    return uvicorn.Server(config)


def run_forever(settings: GatewaySettings) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully."""
    from services.gateway.app import create_app

    bootstrap = resolve_bootstrap(settings)
    _ensure_topics(bootstrap, settings.topic_prefix)
    sock = bind_socket(settings.gateway_host, settings.gateway_port)
    port = sock.getsockname()[1]
    server = _uvicorn_server(create_app(settings, bootstrap), settings)
    log_event(log, "gateway_listen", host=settings.gateway_host, port=port, keys_file=str(settings.resolved_keys_file))
    server.run(sockets=[sock])


def _ensure_topics(bootstrap: str, prefix: str) -> None:
    """Create the gateway's topics if they are missing (best effort: the broker may be down)."""
    from schemas.topics import DLQ, FEEDBACK, GENERATIONS
    from services.kafka.topics import ensure_topics

    try:
        ensure_topics(bootstrap, prefix, (FEEDBACK, GENERATIONS, DLQ), timeout_s=10.0)
    except Exception as exc:
        log_event(log, "gateway_topics_unchecked", logging.WARNING, error=str(exc))


class GatewayServer:
    """The gateway in a background thread (tests, benchmarks)."""

    def __init__(self, settings: GatewaySettings, bootstrap: str) -> None:
        from services.gateway.app import create_app

        self.sock = bind_socket(settings.gateway_host, settings.gateway_port)
        self.port = self.sock.getsockname()[1]
        self.app = create_app(settings, bootstrap)
        self.server = _uvicorn_server(self.app, settings)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway(self) -> Any:
        """The running `Gateway` (state, producer, cache, metrics)."""
        return self.app.state.gateway

    def start(self, timeout_s: float = 30.0) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
