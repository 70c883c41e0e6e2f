"""Assembling and running a replica: broker resolution, socket, uvicorn.

`run_forever` is what `rlfeed serve` runs (uvicorn in the main thread: SIGINT/SIGTERM
stop it gracefully, in-flight requests finish first). `ServerThread` runs the same server
in a background thread, for tests and benchmarks.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from services.listen import bind_socket
from services.logs import event as log_event
from services.serving.settings import ServingSettings

log = logging.getLogger(__name__)


def resolve_bootstrap(settings: ServingSettings) -> str | None:
    """The broker to use: kafka_url, else the embedded broker's, else None (no Kafka)."""
    from services.kafka.embedded import find_bootstrap

    bootstrap = find_bootstrap(settings.kafka_url, settings.home_dir)
    if bootstrap is not None:
        return bootstrap
    log_event(
        log,
        "no_kafka",
        logging.WARNING,
        detail="no RLFEED_KAFKA_URL and no embedded broker: generation events are dropped (counted), "
        "model updates are not followed",
    )
    return None


def build_replica(settings: ServingSettings, port: int, *, store: Any = None) -> Any:
    """Load the engine and wire a Replica for a server listening on `port`."""
    from services.serving.engines import load_engine
    from services.serving.events import EventSink
    from services.serving.replica import Replica

    replica_id = settings.resolved_replica_id(port)
    bootstrap = resolve_bootstrap(settings)
    sink = EventSink(
        bootstrap,
        topic_prefix=settings.topic_prefix,
        buffer_max=settings.event_buffer_max,
        delivery_timeout_s=settings.event_delivery_timeout_s,
        client_id=f"rlfeed-serving-{replica_id}",
    )
    engine = load_engine(settings)
    host = "127.0.0.1" if settings.serving_host in ("0.0.0.0", "::") else settings.serving_host
    url = f"http://{host}:{port}/v1"
    return Replica(settings, engine, sink, bootstrap=bootstrap, replica_id=replica_id, url=url, store=store)


def _uvicorn_server(app: Any, settings: ServingSettings) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=30,
        log_level=settings.log_level.lower(),
    )
    return uvicorn.Server(config)


def run_forever(settings: ServingSettings) -> None:
    """Serve until SIGINT/SIGTERM (uvicorn's handlers), then shut down gracefully."""
    from services.serving.app import create_app

    sock = bind_socket(settings.serving_host, settings.serving_port)
    port = sock.getsockname()[1]
    replica = build_replica(settings, port)
    server = _uvicorn_server(create_app(replica), settings)
    log_event(log, "serving_listen", host=settings.serving_host, port=port, replica_id=replica.replica_id)
    server.run(sockets=[sock])


class ServerThread:
    """A replica's HTTP server in a background thread (tests, benchmarks)."""

    def __init__(self, settings: ServingSettings, *, store: Any = None) -> None:
        from services.serving.app import create_app

        self.sock = bind_socket(settings.serving_host, settings.serving_port)
        self.port = self.sock.getsockname()[1]
        self.replica = build_replica(settings, self.port, store=store)
        self.server = _uvicorn_server(create_app(self.replica), settings)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>/v1`, for the openai client."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the serving replica did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
