"""Events a replica produces, and the fire-and-forget producer that sends them.

`EventSink` never blocks a response: `emit` hands the encoded event to librdkafka's
in-memory queue and returns. While the broker is unreachable the queue holds up to
`event_buffer_max` events; an event that does not fit, or that waits longer than
`event_delivery_timeout_s`, is dropped and counted (`dropped`). When the broker comes
back librdkafka delivers what it holds, in order, by itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from typing import Any

from schemas.codec import encode, key_of
from schemas.events import Event, FinishReason, GenerationEvent, SamplingParams
from schemas.topics import Topic
from services.kafka.producers import producer_config
from services.logs import event as log_event

log = logging.getLogger(__name__)


def generation_event(
    *,
    generation_id: str,
    model: str,
    policy_version: int,
    prompt: str,
    completion: str,
    prompt_token_ids: list[int],
    completion_token_ids: list[int],
    completion_logprobs: list[float],
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int | None,
    finish_reason: str,
    user_id: str,
    session_id: str | None,
    replica_id: str,
    latency_ms: float,
) -> GenerationEvent:
    """The generations.v1 event of one finished completion."""
    return GenerationEvent(
        generation_id=generation_id,
        model=model,
        policy_version=policy_version,
        prompt=prompt,
        completion=completion,
        prompt_token_ids=prompt_token_ids,
        completion_token_ids=completion_token_ids,
        completion_logprobs=completion_logprobs,
        sampling=SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed),
        finish_reason=FinishReason.LENGTH if finish_reason == "length" else FinishReason.STOP,
        user_id=user_id,
        session_id=session_id,
        replica_id=replica_id,
        latency_ms=max(0.0, latency_ms),
    )


class EventSink:
    """Sends events to Kafka without blocking; bounded buffer, counted drops.

    With `bootstrap=None` (no broker configured) every event is dropped and counted.
    """

    def __init__(
        self,
        bootstrap: str | None,
        *,
        topic_prefix: str = "",
        buffer_max: int = 10_000,
        delivery_timeout_s: float = 600.0,
        client_id: str = "rlfeed-serving",
    ) -> None:
        self.topic_prefix = topic_prefix
        self.bootstrap = bootstrap
        self.emitted = 0
        """Events handed to the producer."""
        self.delivered = 0
        """Events the broker acknowledged."""
        self.dropped: Counter[str] = Counter()
        """Events lost, by reason: `buffer_full`, `delivery_failed`, `no_broker`, `encode_failed`."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._producer: Any = None
        self._broker_down_logged = 0.0
        self._thread: threading.Thread | None = None
        if bootstrap is None:
            return
        from confluent_kafka import Producer

        self._producer = Producer(
            {
                **producer_config(bootstrap),
                "client.id": client_id,
                "queue.buffering.max.messages": buffer_max,
                "message.timeout.ms": int(delivery_timeout_s * 1000),
                "linger.ms": 5,
                # Topics are created from the registry (partition counts matter); never by a produce.
                "allow.auto.create.topics": False,
                "reconnect.backoff.ms": 100,
                "reconnect.backoff.max.ms": 2000,
                "error_cb": self._on_error,
                "logger": logging.getLogger("librdkafka"),
            }
        )
        self._thread = threading.Thread(target=self._poll, name="event-sink", daemon=True)
        self._thread.start()

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped_by_reason().values())

    def dropped_by_reason(self) -> dict[str, int]:
        """A copy of `dropped` (the delivery thread adds to it)."""
        with self._lock:
            return dict(self.dropped)

    @property
    def buffered(self) -> int:
        """Events (plus pending callbacks: librdkafka counts both) waiting in memory for the broker."""
        return len(self._producer) if self._producer is not None else 0

    def emit(self, topic: Topic, ev: Event) -> bool:
        """Queue one event for `topic`; False if it was dropped (counted)."""
        try:
            value = encode(ev)
            key = key_of(ev, topic.key)
        except Exception:
            log.exception("event_encode_failed")
            self.drop("encode_failed")
            return False
        if self._producer is None:
            self.drop("no_broker")
            return False
        try:
            self._producer.produce(
                topic.full_name(self.topic_prefix), value=value, key=key, on_delivery=self._on_delivery
            )
        except BufferError:
            self.drop("buffer_full")
            return False
        with self._lock:
            self.emitted += 1
        return True

    def flush(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for buffered events to be delivered; returns how many remain."""
        if self._producer is None:
            return 0
        return int(self._producer.flush(timeout_s))

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush for at most `timeout_s`, then stop; what remains is counted as dropped."""
        remaining = self.flush(timeout_s)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._producer = None  # librdkafka's threads end when the producer is freed
        if remaining:
            self.drop("shutdown", remaining)
            log_event(log, "events_lost_at_shutdown", logging.WARNING, count=remaining)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count `n` events lost for `reason` (also for events that never reached `emit`)."""
        with self._lock:
            self.dropped[reason] += n

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.1)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is None:
            with self._lock:
                self.delivered += 1
        else:
            self.drop("delivery_failed")
            log_event(log, "event_delivery_failed", logging.WARNING, topic=msg.topic(), error=str(err))

    def _on_error(self, err: Any) -> None:
        now = time.monotonic()
        if now - self._broker_down_logged > 30:  # one line per outage, not per retry
            self._broker_down_logged = now
            log_event(log, "kafka_producer_error", logging.WARNING, error=str(err), buffered=self.buffered)
