"""`AsyncFeedbackClient` (asyncio) and `FeedbackClient` (threads): buffered, batched,
retried delivery of feedback and generation events.

How an event travels:
1. `feedback(...)` builds and validates the event in the caller (a bad kind or value raises
   at once, naming the field) and gives it an event_id, which is also its idempotency key.
2. It waits in a bounded in-memory buffer (`max_buffer_events`; beyond it new events are
   dropped and counted in `stats.dropped`, so the app's request path never blocks).
3. A background task takes up to `batch_max_events` per topic after at most
   `batch_linger_s` and sends them; a busy or unreachable gateway/broker is retried with
   exponential backoff and jitter (honouring Retry-After) up to `max_attempts`, always with
   the same event ids: the gateway answers an id it already accepted as a duplicate, and
   consumers dedupe by event_id.
4. `flush()` waits until everything queued so far is delivered (or failed); `close()`
   flushes and releases connections; an unclosed client flushes at interpreter exit.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import random
import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from schemas.events import Event, FeedbackEvent, GenerationEvent
from schemas.topics import FEEDBACK, GENERATIONS, Topic
from services.logs import event as log_event
from services.sdk.transports import HttpTransport, KafkaTransport, Rejected, Retryable, Transport

log = logging.getLogger("rlfeed.sdk")


def backoff_delay(
    attempt: int, initial_s: float, max_s: float, retry_after_s: float | None = None, jitter: float | None = None
) -> float:
    """Seconds to wait before retry number `attempt` (1-based): exponential, capped, with
    "equal jitter" (half fixed, half random), and never shorter than the server's Retry-After."""
    base = min(max_s, initial_s * (2 ** (attempt - 1)))
    r = random.random() if jitter is None else jitter
    delay = base / 2 + base / 2 * r
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max_s))
    return delay


@dataclass
class ClientStats:
    """What happened to the events handed to a client."""

    queued: int = 0
    sent: int = 0
    """Delivered (the gateway answered 200, or Kafka acknowledged with acks=all)."""
    failed: int = 0
    """Given up on: rejected as invalid, or still failing after max_attempts."""
    dropped: int = 0
    """Not buffered because the buffer was full."""
    retries: int = 0
    """Batch attempts that were retried."""


class AsyncFeedbackClient:
    """Send events from an asyncio app. Use `async with`, or `await close()` at shutdown.

    transport="http": `url` of the gateway and `api_key` (the tenant comes from the key).
    transport="kafka": `bootstrap` (`host:port,...`), `topic_prefix` and `tenant`.
    """

    def __init__(
        self,
        *,
        transport: Literal["http", "kafka"] = "http",
        url: str | None = None,
        api_key: str | None = None,
        bootstrap: str | None = None,
        topic_prefix: str = "",
        tenant: str = "default",
        batch_max_events: int = 500,
        batch_linger_s: float = 0.05,
        max_buffer_events: int = 100_000,
        max_attempts: int = 10,
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 10.0,
        timeout_s: float = 30.0,
        flush_at_exit: bool = True,
    ) -> None:
        if transport == "http" and (not url or not api_key):
            raise ValueError("transport=http needs url (the gateway) and api_key")
        if transport == "kafka" and not bootstrap:
            raise ValueError("transport=kafka needs bootstrap (host:port,...)")
        if transport not in ("http", "kafka"):
            raise ValueError(f"transport: expected http or kafka, got {transport!r}")
        self.transport_kind = transport
        self._transport_args: dict[str, Any] = (
            {"url": url, "api_key": api_key, "timeout_s": timeout_s}
            if transport == "http"
            else {"bootstrap": bootstrap, "topic_prefix": topic_prefix, "timeout_s": timeout_s}
        )
        self.tenant = tenant if transport == "kafka" else "default"
        self.batch_max_events = batch_max_events
        self.batch_linger_s = batch_linger_s
        self.max_buffer_events = max_buffer_events
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.stats = ClientStats()
        self._queues: dict[str, deque[Event]] = {FEEDBACK.name: deque(), GENERATIONS.name: deque()}
        self._topics = {FEEDBACK.name: FEEDBACK, GENERATIONS.name: GENERATIONS}
        self._inflight = 0
        self._transport: Transport | None = None
        self._worker: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._urgent: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._closed = False
        if flush_at_exit:
            atexit.register(self._flush_at_exit)

    # -- building events (any thread) ----------------------------------------------------
    def build_feedback(
        self,
        generation_id: str,
        kind: str,
        value: float | None = None,
        *,
        user_id: str,
        session_id: str | None = None,
        edited_text: str | None = None,
        final: bool = False,
        event_id: str | None = None,
        event_time_ms: int | None = None,
    ) -> FeedbackEvent:
        """A validated feedback event (pydantic ValidationError names the bad field)."""
        fields: dict[str, Any] = {
            "generation_id": generation_id,
            "kind": kind,
            "value": value,
            "user_id": user_id,
            "session_id": session_id,
            "edited_text": edited_text,
            "final": final,
            "tenant_id": self.tenant,
        }
        if event_id is not None:
            fields["event_id"] = event_id
        if event_time_ms is not None:
            fields["event_time_ms"] = event_time_ms
        return FeedbackEvent(**fields)

    def build_generation(self, event: GenerationEvent | None = None, **fields: Any) -> GenerationEvent:
        """A validated generation event, from an event or from its fields."""
        if event is None:
            return GenerationEvent(**{"tenant_id": self.tenant, **fields})
        return event if event.tenant_id == self.tenant else event.model_copy(update={"tenant_id": self.tenant})

    # -- public API (the client's event loop) --------------------------------------------
    async def feedback(self, generation_id: str, kind: str, value: float | None = None, **kw: Any) -> str:
        """Queue one feedback event; returns its event_id. See `build_feedback` for fields."""
        ev = self.build_feedback(generation_id, kind, value, **kw)
        self.enqueue(FEEDBACK, ev)
        return ev.event_id

    async def generation(self, event: GenerationEvent | None = None, **fields: Any) -> str:
        """Queue one generation event (apps that serve their own models); returns its event_id."""
        ev = self.build_generation(event, **fields)
        self.enqueue(GENERATIONS, ev)
        return ev.event_id

    @property
    def pending(self) -> int:
        """Events queued or being sent."""
        return sum(len(q) for q in self._queues.values()) + self._inflight

    def enqueue(self, topic: Topic, ev: Event) -> bool:
        """Put a built event in the buffer (call from the client's loop); False if dropped."""
        if self._closed:
            raise RuntimeError("the client is closed")
        if self.pending >= self.max_buffer_events:
            self.stats.dropped += 1
            if self.stats.dropped == 1 or self.stats.dropped % 1000 == 0:
                log_event(log, "sdk_buffer_full", logging.WARNING, dropped=self.stats.dropped)
            return False
        self._start()
        queue = self._queues[topic.name]
        queue.append(ev)
        self.stats.queued += 1
        assert self._wakeup is not None and self._idle is not None and self._urgent is not None
        self._idle.clear()
        self._wakeup.set()
        if len(queue) >= self.batch_max_events:
            self._urgent.set()
        return True

    async def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until everything queued is delivered or failed; TimeoutError past `timeout_s`."""
        if self._worker is None or self.pending == 0:
            return
        assert self._urgent is not None and self._idle is not None
        self._urgent.set()
        await asyncio.wait_for(self._idle.wait(), timeout_s)

    async def close(self, timeout_s: float = 30.0) -> None:
        """Flush (up to `timeout_s`), stop the background task, release connections."""
        if self._closed:
            return
        try:
            await self.flush(timeout_s)
        except TimeoutError:
            log_event(log, "sdk_close_unflushed", logging.WARNING, pending=self.pending)
        finally:
            self._closed = True
            atexit.unregister(self._flush_at_exit)
            if self._worker is not None:
                self._worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._worker
            if self._transport is not None:
                await self._transport.close()

    async def __aenter__(self) -> AsyncFeedbackClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- background delivery -------------------------------------------------------------
    def _new_transport(self) -> Transport:
        if self.transport_kind == "http":
            return HttpTransport(**self._transport_args)
        return KafkaTransport(**self._transport_args)

    def _start(self) -> None:
        if self._worker is None:
            self._wakeup, self._urgent, self._idle = asyncio.Event(), asyncio.Event(), asyncio.Event()
            self._transport = self._new_transport()
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="rlfeed-sdk")

    async def _run(self) -> None:
        assert self._wakeup is not None and self._urgent is not None and self._idle is not None
        while True:
            if self.pending == 0:
                self._idle.set()
                self._urgent.clear()
                await self._wakeup.wait()
            self._wakeup.clear()
            if not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), self.batch_linger_s)
            for name, queue in self._queues.items():
                while queue:
                    n = min(len(queue), self.batch_max_events)
                    batch = [queue.popleft() for _ in range(n)]
                    self._inflight += n
                    try:
                        await self._deliver(self._topics[name], batch)
                    finally:
                        self._inflight -= n
            if self.pending == 0:
                self._urgent.clear()

    async def _deliver(self, topic: Topic, batch: Sequence[Event], transport: Transport | None = None) -> None:
        """Send one batch, retrying with backoff; count what was sent or given up on."""
        transport = transport or self._transport
        assert transport is not None
        events = list(batch)
        attempt = 0
        while events:
            try:
                await transport.send(topic, events)
            except Rejected as exc:
                if exc.index is not None and 0 <= exc.index < len(events):
                    bad = events.pop(exc.index)
                    self.stats.failed += 1
                    log_event(log, "sdk_event_rejected", logging.WARNING, event_id=bad.event_id, error=str(exc))
                    continue
                self.stats.failed += len(events)
                log_event(log, "sdk_batch_rejected", logging.WARNING, events=len(events), error=str(exc))
                return
            except Retryable as exc:
                attempt += 1
                if attempt >= self.max_attempts:
                    self.stats.failed += len(events)
                    log_event(
                        log, "sdk_batch_failed", logging.WARNING, events=len(events), attempts=attempt, error=str(exc)
                    )
                    return
                self.stats.retries += 1
                delay = backoff_delay(attempt, self.backoff_initial_s, self.backoff_max_s, exc.retry_after_s)
                log_event(
                    log,
                    "sdk_retry",
                    logging.INFO,
                    events=len(events),
                    attempt=attempt,
                    delay_s=round(delay, 3),
                    error=str(exc),
                )
                await asyncio.sleep(delay)
                continue
            self.stats.sent += len(events)
            return

    def _flush_at_exit(self, timeout_s: float = 10.0) -> None:
        """Interpreter exit: send what is still buffered with a fresh loop and transport."""
        if self._closed or self.pending == 0:
            return
        leftovers = {name: list(q) for name, q in self._queues.items()}
        for q in self._queues.values():
            q.clear()
        self._closed = True

        async def drain() -> None:
            transport = self._new_transport()
            try:
                for name, events in leftovers.items():
                    for i in range(0, len(events), self.batch_max_events):
                        await self._deliver(self._topics[name], events[i : i + self.batch_max_events], transport)
            finally:
                await transport.close()

        try:
            asyncio.run(asyncio.wait_for(drain(), timeout_s))
        except Exception as exc:
            log_event(log, "sdk_exit_flush_failed", logging.WARNING, error=repr(exc))


class FeedbackClient:
    """The same client for threaded (synchronous) apps: calls never block on the network.

    A daemon thread runs an `AsyncFeedbackClient` on its own event loop. Use `with`, or
    `close()` at shutdown; an unclosed client flushes at interpreter exit.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs["flush_at_exit"] = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rlfeed-sdk", daemon=True)
        self._thread.start()
        self._client = AsyncFeedbackClient(**kwargs)
        self._closed = False
        atexit.register(self.close, 10.0)

    @property
    def stats(self) -> ClientStats:
        return self._client.stats

    @property
    def pending(self) -> int:
        return self._client.pending

    def feedback(self, generation_id: str, kind: str, value: float | None = None, **kw: Any) -> str:
        """Queue one feedback event; returns its event_id (validation errors raise here)."""
        ev = self._client.build_feedback(generation_id, kind, value, **kw)
        self._call(self._client.enqueue, FEEDBACK, ev)
        return ev.event_id

    def generation(self, event: GenerationEvent | None = None, **fields: Any) -> str:
        """Queue one generation event; returns its event_id."""
        ev = self._client.build_generation(event, **fields)
        self._call(self._client.enqueue, GENERATIONS, ev)
        return ev.event_id

    def _call(self, fn: Any, *args: Any) -> None:
        if self._closed:
            raise RuntimeError("the client is closed")
        self._loop.call_soon_threadsafe(fn, *args)

    def flush(self, timeout_s: float = 30.0) -> None:
        """Block until everything queued so far is delivered or failed (TimeoutError past it)."""
        fut = asyncio.run_coroutine_threadsafe(self._client.flush(timeout_s), self._loop)
        fut.result(timeout_s + 5.0)

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush (up to `timeout_s`), then stop the background thread."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(timeout_s), self._loop).result(timeout_s + 10.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10.0)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> FeedbackClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
