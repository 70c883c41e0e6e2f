"""The gateway's HTTP API (FastAPI): ingest feedback and generations into Kafka.

Request path, in order: 1. authenticate the API key (401), 2. read the body under
`max_request_bytes` (413), 3. validate every event with the codec (422, dead-lettered),
4. drop ids already accepted within the idempotency window (the original acceptance is
answered), 5. admit the rest only if the broker is up (503) and they fit under
`max_inflight_events` (429), 6. produce with acks=all and answer 200 only once every
event is acknowledged (503 if the broker did not acknowledge within `produce_timeout_s`).

Bodies are read raw and validated by `schemas.codec`, not by FastAPI, so errors read the
same as everywhere else in rlfeed; the OpenAPI document still describes every body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.codec import MAX_MESSAGE_BYTES, InvalidEvent, dead_letter, encode, key_of
from schemas.topics import DLQ, FEEDBACK, GENERATIONS, Topic
from services.apikeys import KeyStore
from services.gateway.idempotency import Entry, IdempotencyCache
from services.gateway.metrics import GatewayMetrics
from services.gateway.openapi import extend_openapi, operation_doc
from services.gateway.producer import KafkaSink
from services.gateway.settings import GatewaySettings
from services.gateway.validation import ApiError, Parsed, check_idempotency_key, parse_batch, parse_single
from services.logs import event as log_event

log = logging.getLogger(__name__)

VERSION = "1"
_JSON = "application/json"


@dataclass
class Gateway:
    """Everything a request needs: settings, keys, idempotency memory, producer, metrics."""

    settings: GatewaySettings
    keys: KeyStore
    cache: IdempotencyCache
    sink: KafkaSink
    metrics: GatewayMetrics

    # -- steps ---------------------------------------------------------------------------
    def authenticate(self, request: Request) -> str:
        auth = request.headers.get("authorization")
        key = None
        if auth is not None:
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer":
                key = token.strip()
        key = key or request.headers.get("x-api-key")
        if not key:
            raise ApiError(
                401,
                "missing API key: send `Authorization: Bearer <key>`",
                field="Authorization",
                type="authentication_error",
            )
        tenant = self.keys.tenant_of(key)
        if tenant is None:
            raise ApiError(401, "invalid API key", field="Authorization", type="authentication_error")
        return tenant

    async def read_body(self, request: Request) -> bytes:
        limit = self.settings.max_request_bytes
        ctype = request.headers.get("content-type")
        if ctype is not None and ctype.split(";")[0].strip().lower() not in (_JSON, "application/*+json"):
            raise ApiError(415, f"Content-Type: expected {_JSON}, got {ctype[:100]!r}", field="Content-Type")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(
                413, f"request body of {length} bytes exceeds {limit}", field="body", type="request_too_large"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"request body exceeds {limit} bytes", field="body", type="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def reject(self, err: ApiError, topic: Topic, tenant: str) -> None:
        """Dead-letter the rejected events (best effort, bounded)."""
        dlq = DLQ.full_name(self.settings.topic_prefix)
        source = topic.full_name(self.settings.topic_prefix)
        for invalid in err.invalid[: self.settings.dead_letters_per_request]:
            try:
                letter = dead_letter(invalid, source_topic=source, rejected_by="gateway")
                letter = letter.model_copy(update={"tenant_id": tenant})
                self.sink.produce_dead_letter(dlq, None, encode(letter))
            except Exception:
                log.exception("gateway_dead_letter_failed")
        self.metrics.events.labels(topic.name, "rejected").inc(max(1, len(err.invalid)))

    async def accept(self, topic: Topic, tenant: str, items: list[Parsed]) -> list[tuple[str, bool]]:
        """Produce the new events among `items`; return (event_id, duplicate) per item."""
        cache = self.cache
        fresh: list[tuple[int, tuple[str, str, str], Parsed]] = []
        waits: list[tuple[int, Entry]] = []
        first_in_request: dict[str, tuple[int, bytes]] = {}
        results: list[tuple[str, bool]] = []
        for i, item in enumerate(items):
            event_id = item.event.event_id
            results.append((event_id, False))
            field = "event_id" if len(items) == 1 else f"events.{i}.event_id"
            if event_id in first_in_request:
                if first_in_request[event_id][1] != item.digest:
                    raise _conflict(field)
                results[i] = (event_id, True)
                continue
            first_in_request[event_id] = (i, item.digest)
            ckey = (tenant, topic.name, event_id)
            entry = cache.get(ckey)
            if entry is None:
                fresh.append((i, ckey, item))
            elif entry.digest != item.digest:
                raise _conflict(field)
            elif entry.accepted:
                results[i] = (event_id, True)
            else:
                waits.append((i, entry))
        if fresh:
            self.admit(topic, len(fresh))
            await self.produce(topic, fresh)
        for i, entry in waits:
            fut, index = entry.pending
            if (await self.wait(fut))[index] is not None:
                raise self.unavailable(1, len(items), topic)
            results[i] = (results[i][0], True)
        dups = sum(1 for _, dup in results if dup)
        if dups:
            self.metrics.events.labels(topic.name, "duplicate").inc(dups)
        return results

    def admit(self, topic: Topic, n: int) -> None:
        retry = self.settings.retry_after_s
        if not self.sink.available:
            self.metrics.events.labels(topic.name, "unavailable").inc(n)
            raise ApiError(503, "the Kafka broker is unavailable; retry later", type="unavailable", retry_after_s=retry)
        if not self.sink.has_room(n):
            self.metrics.events.labels(topic.name, "throttled").inc(n)
            raise ApiError(
                429,
                f"too many events waiting for the broker (limit {self.sink.max_inflight_events}); retry later",
                type="rate_limited",
                retry_after_s=retry,
            )

    async def produce(self, topic: Topic, fresh: list[tuple[int, tuple[str, str, str], Parsed]]) -> None:
        wire: list[tuple[bytes | None, bytes]] = []
        for i, _, item in fresh:
            value = encode(item.event)
            if len(value) > MAX_MESSAGE_BYTES:
                field = "body" if len(fresh) == 1 else f"events.{i}"
                raise ApiError(413, f"event of {len(value)} bytes exceeds {MAX_MESSAGE_BYTES}", field=field)
            wire.append((key_of(item.event, topic.key), value))
        fut = self.sink.produce_batch(topic.full_name(self.settings.topic_prefix), wire)
        entries = []
        for n, (_, ckey, item) in enumerate(fresh):
            entry = Entry(item.digest, pending=(fut, n))
            self.cache.put(ckey, entry)
            entries.append((ckey, entry))
        fut.add_done_callback(partial(self._settle, topic, entries))
        errors = await self.wait(fut)
        failed = sum(1 for e in errors if e is not None)
        if failed:
            log_event(
                log,
                "gateway_produce_failed",
                logging.WARNING,
                topic=topic.name,
                failed=failed,
                error=next(e for e in errors if e is not None),
            )
            raise self.unavailable(failed, len(errors), topic)

    def _settle(self, topic: Topic, entries: list[tuple[Any, Entry]], fut: asyncio.Future[list[str | None]]) -> None:
        errors = fut.result() if not fut.cancelled() else [("cancelled")] * len(entries)
        ok = 0
        for (ckey, entry), err in zip(entries, errors, strict=True):
            if err is None:
                entry.accepted, entry.pending = True, None
                ok += 1
            else:
                self.cache.discard(ckey, entry)
        self.metrics.events.labels(topic.name, "accepted").inc(ok)
        if ok < len(entries):
            self.metrics.events.labels(topic.name, "failed").inc(len(entries) - ok)

    async def wait(self, fut: asyncio.Future[list[str | None]]) -> list[str | None]:
        # librdkafka settles every message within message.timeout.ms; the margin is a safety net.
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.settings.produce_timeout_s + 5.0)
        except TimeoutError:
            raise ApiError(
                503,
                "the broker did not acknowledge in time; retry with the same event ids",
                type="unavailable",
                retry_after_s=self.settings.retry_after_s,
            ) from None

    def unavailable(self, failed: int, total: int, topic: Topic) -> ApiError:
        return ApiError(
            503,
            f"the broker did not acknowledge {failed} of {total} events within {self.settings.produce_timeout_s} s; "
            "retry with the same event ids (accepted ones are not produced twice)",
            type="unavailable",
            retry_after_s=self.settings.retry_after_s,
        )


def _conflict(field: str) -> ApiError:
    return ApiError(409, f"{field}: already used for a different event", field=field, type="idempotency_conflict")


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers, media_type=_JSON)


def create_app(
    settings: GatewaySettings,
    bootstrap: str,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> FastAPI:
    """The gateway application. The producer starts with the app (lifespan) and flushes
    what it holds when the app stops."""
    state: dict[str, Gateway] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        gw = Gateway(
            settings=settings,
            keys=KeyStore(settings.resolved_keys_file),
            cache=IdempotencyCache(settings.idempotency_window_s, settings.idempotency_max_entries, clock),
            sink=KafkaSink(
                bootstrap,
                max_inflight_events=settings.max_inflight_events,
                dead_letter_max_inflight=settings.dead_letter_max_inflight,
                produce_timeout_s=settings.produce_timeout_s,
                probe_topic=FEEDBACK.full_name(settings.topic_prefix),
                probe_interval_s=settings.broker_probe_interval_s,
                linger_ms=settings.linger_ms,
                enable_idempotence=settings.enable_idempotence,
            ),
            metrics=GatewayMetrics(),
        )
        gw.metrics.bind(gw)
        state["gw"] = gw
        app.state.gateway = gw
        log_event(log, "gateway_started", bootstrap=bootstrap, keys=len(gw.keys), prefix=settings.topic_prefix)
        try:
            yield
        finally:
            await asyncio.to_thread(gw.sink.close, min(30.0, settings.produce_timeout_s + 1))
            log_event(log, "gateway_stopped")

    app = FastAPI(
        title="rlfeed gateway",
        version=VERSION,
        description="Ingest feedback and generations from product apps into rlfeed's Kafka topics.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )

    async def handle(endpoint: str, request: Request, fn: Callable[[Gateway], Awaitable[tuple[int, Any]]]) -> Response:
        gw = state["gw"]
        t0 = time.perf_counter()
        headers = None
        try:
            status, body = await fn(gw)
        except ApiError as err:
            status, body = err.status, err.body()
            if err.retry_after_s is not None:
                headers = {"Retry-After": str(err.retry_after_s)}
            if status == 401:
                headers = {"WWW-Authenticate": "Bearer"}
        except Exception:
            log.exception("gateway_internal_error")
            status, body = 500, ApiError(500, "internal error", type="internal_error").body()
        gw.metrics.requests.labels(endpoint, str(status)).inc()
        gw.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return _json(status, body, headers)

    def ingest_one(topic: Topic) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            async def run(gw: Gateway) -> tuple[int, Any]:
                tenant = gw.authenticate(request)
                raw = await gw.read_body(request)
                try:
                    idem = check_idempotency_key(request.headers.get("idempotency-key"))
                    parsed = parse_single(topic.event, raw, tenant, idem)
                except InvalidEvent as err:
                    api = ApiError(422, str(err), field=err.field, type="invalid_event", invalid=[err])
                    gw.reject(api, topic, tenant)
                    raise api from None
                [(event_id, dup)] = await gw.accept(topic, tenant, [parsed])
                return 200, {"event_id": event_id, "duplicate": dup}

            return await handle(topic.name, request, run)

        return route

    def ingest_batch(topic: Topic) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            async def run(gw: Gateway) -> tuple[int, Any]:
                tenant = gw.authenticate(request)
                raw = await gw.read_body(request)
                if request.headers.get("idempotency-key") is not None:
                    raise ApiError(
                        422,
                        "Idempotency-Key: applies to single events; give each event of a batch its event_id",
                        field="Idempotency-Key",
                    )
                try:
                    items = parse_batch(topic.event, raw, tenant, gw.settings.max_batch_events)
                except ApiError as err:
                    if err.invalid:
                        gw.reject(err, topic, tenant)
                    raise
                results = await gw.accept(topic, tenant, items)
                dups = sum(1 for _, d in results if d)
                return 200, {
                    "accepted": len(results) - dups,
                    "duplicates": dups,
                    "event_ids": [e for e, _ in results],
                }

            return await handle(f"{topic.name}/batch", request, run)

        return route

    for topic, path in ((FEEDBACK, "/v1/feedback"), (GENERATIONS, "/v1/generations")):
        app.add_api_route(path, ingest_one(topic), methods=["POST"], **operation_doc(topic, batch=False))
        app.add_api_route(f"{path}/batch", ingest_batch(topic), methods=["POST"], **operation_doc(topic, batch=True))

    @app.get("/health", summary="Liveness and broker state", responses={503: {"description": "broker down"}})
    async def health() -> Response:
        gw = state["gw"]
        up = gw.sink.available
        body = {
            "status": "ok" if up else "unavailable",
            "broker": "up" if up else "down",
            "inflight_events": gw.sink.inflight,
            "max_inflight_events": gw.sink.max_inflight_events,
            "idempotency_entries": len(gw.cache),
        }
        headers = None if up else {"Retry-After": str(settings.retry_after_s)}
        return _json(200 if up else 503, body, headers)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        return state["gw"].metrics.render()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        err = ApiError(
            exc.status_code, str(exc.detail), type="not_found" if exc.status_code == 404 else "invalid_request_error"
        )
        return _json(exc.status_code, err.body(), getattr(exc, "headers", None))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            app.openapi_schema = extend_openapi(doc, settings.max_batch_events)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
