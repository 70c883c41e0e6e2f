"""The gateway's Kafka producer: acks=all, bounded in-flight events, broker up/down state.

librdkafka (confluent-kafka) does the sending; a poll thread runs its delivery callbacks
and hands each batch's outcome back to the event loop in one `call_soon_threadsafe`.

Memory stays bounded: the gateway admits a request only while fewer than
`max_inflight_events` events await acknowledgement (429 otherwise), and librdkafka's own
queue is capped a little above that. While the broker is down (all connections lost, or a
delivery timed out) the gateway answers 503 at once; the poll thread probes the broker
every `broker_probe_interval_s` and reopens as soon as it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import Counter
from functools import partial
from typing import Any

from services.kafka.producers import producer_config
from services.logs import event as log_event

log = logging.getLogger(__name__)


class _Batch:
    """Delivery outcome of one produce_batch call (poll thread writes, loop reads)."""

    __slots__ = ("errors", "future", "lock", "loop", "remaining", "sink")

    def __init__(self, sink: KafkaSink, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.sink = sink
        self.lock = sink._lock
        self.loop = loop
        self.future: asyncio.Future[list[str | None]] = loop.create_future()
        self.errors: list[str | None] = [None] * n
        self.remaining = n

    def on_delivery(self, index: int, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors[index] = str(err)
        self.sink._delivered(err)
        with self.lock:
            self.remaining -= 1
            last = self.remaining == 0
        if last:
            # RuntimeError: the loop is closed (flush at shutdown) and nobody waits any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        self.sink.inflight -= len(self.errors)
        if not self.future.done():
            self.future.set_result(self.errors)


class KafkaSink:
    """One librdkafka producer shared by every request of a gateway process."""

    def __init__(
        self,
        bootstrap: str,
        *,
        max_inflight_events: int,
        dead_letter_max_inflight: int,
        produce_timeout_s: float,
        probe_topic: str,
        probe_interval_s: float = 1.0,
        linger_ms: float = 2.0,
        enable_idempotence: bool = False,
        client_id: str = "rlfeed-gateway",
    ) -> None:
        from confluent_kafka import Producer

        self.max_inflight_events = max_inflight_events
        self.dead_letter_max_inflight = dead_letter_max_inflight
        self.inflight = 0
        """Events admitted and not yet acknowledged or failed (event-loop thread only)."""
        self.dead_letters_inflight = 0
        self.available = True
        """False from a broker outage until a probe or a delivery succeeds."""
        self.dead_letters: Counter[str] = Counter()
        """Dead letters by outcome: written, failed, dropped (bound reached)."""
        self.probe_topic = probe_topic
        self.probe_interval_s = probe_interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._producer = Producer(
            {
                **producer_config(bootstrap),
                "client.id": client_id,
                "acks": "all",
                "enable.idempotence": enable_idempotence,
                "linger.ms": linger_ms,
                "message.timeout.ms": max(1, int(produce_timeout_s * 1000)),
                "queue.buffering.max.messages": max_inflight_events + dead_letter_max_inflight + 16,
                "queue.buffering.max.kbytes": 1_048_576,
                "compression.type": "lz4",
                # Small produce requests must not wait for delayed ACKs (Nagle): tens of ms each.
                "socket.nagle.disable": True,
                # Topics come from the registry (partition counts matter), never from a produce.
                "allow.auto.create.topics": False,
                "reconnect.backoff.ms": 100,
                "reconnect.backoff.max.ms": 1000,
                "error_cb": self._on_error,
                "logger": logging.getLogger("librdkafka"),
            }
        )
        self._thread = threading.Thread(target=self._poll_loop, name="gateway-producer", daemon=True)
        self._thread.start()

    # -- admission (event-loop thread) ---------------------------------------------------
    def has_room(self, n: int) -> bool:
        """Whether `n` more events fit under max_inflight_events."""
        return self.inflight + n <= self.max_inflight_events

    def produce_batch(self, topic: str, items: list[tuple[bytes | None, bytes]]) -> asyncio.Future[list[str | None]]:
        """Hand `items` (key, value) to librdkafka; the future settles with one error (or None)
        per item once every item is acknowledged by all in-sync replicas or has failed."""
        loop = asyncio.get_running_loop()
        batch = _Batch(self, loop, len(items))
        self.inflight += len(items)
        produce = self._producer.produce
        for i, (key, value) in enumerate(items):
            try:
                produce(topic, value=value, key=key, on_delivery=partial(batch.on_delivery, i))
            except Exception as exc:  # BufferError cannot happen below the admission bound; fail safe
                batch.on_delivery(i, f"local produce failed: {exc}", None)
        if not items:
            batch._finish()
        return batch.future

    def produce_dead_letter(self, topic: str, key: bytes | None, value: bytes) -> bool:
        """Best effort: queue one dead letter unless the dead-letter bound is reached."""
        if self.dead_letters_inflight >= self.dead_letter_max_inflight:
            self.dead_letters["dropped"] += 1
            return False
        try:
            self._producer.produce(topic, value=value, key=key, on_delivery=self._on_dead_letter)
        except Exception:  # BufferError, KafkaException: best effort only
            self.dead_letters["dropped"] += 1
            return False
        with self._lock:
            self.dead_letters_inflight += 1
        return True

    # -- poll thread ---------------------------------------------------------------------
    def _on_dead_letter(self, err: Any, _msg: Any) -> None:
        with self._lock:
            self.dead_letters_inflight -= 1
        self.dead_letters["failed" if err is not None else "written"] += 1

    def _delivered(self, err: Any) -> None:
        if err is None:
            if not self.available:
                self._set_available(True, "delivery")
            return
        from confluent_kafka import KafkaError

        if getattr(err, "code", lambda: None)() == KafkaError._MSG_TIMED_OUT:
            self._set_available(False, str(err))

    def _on_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._set_available(False, str(err))
        else:
            log_event(log, "gateway_kafka_error", logging.WARNING, error=str(err))

    def _set_available(self, up: bool, why: str) -> None:
        if up == self.available:
            return
        self.available = up
        log_event(log, "gateway_broker_up" if up else "gateway_broker_down", logging.WARNING, reason=why)

    def _poll_loop(self) -> None:
        next_probe = 0.0
        while not self._stop.is_set():
            self._producer.poll(0.05)
            if not self.available and time.monotonic() >= next_probe:
                next_probe = time.monotonic() + self.probe_interval_s
                self._probe()

    def _probe(self) -> None:
        try:
            meta = self._producer.list_topics(self.probe_topic, timeout=min(2.0, self.probe_interval_s * 2))
        except Exception:
            return
        topic = meta.topics.get(self.probe_topic)
        if topic is not None and topic.error is None and meta.brokers:
            self._set_available(True, "probe")

    # -- shutdown ------------------------------------------------------------------------
    def pending(self) -> int:
        """Messages librdkafka still holds (events and dead letters)."""
        return len(self._producer)

    def close(self, timeout_s: float = 10.0) -> int:
        """Flush what is queued (up to `timeout_s`), stop the poll thread; returns messages left."""
        self._stop.set()
        self._thread.join(5.0)
        left = self._producer.flush(timeout_s)
        if left:
            log_event(log, "gateway_flush_incomplete", logging.WARNING, messages_left=left)
        return left
