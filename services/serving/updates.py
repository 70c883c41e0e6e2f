"""Following model-updates.v1: every replica reads the whole compacted topic itself.

No consumer group offsets are committed (each replica must see every version, and a
restarted replica must find the latest one again), so partitions are assigned, not
subscribed, from the beginning. On start the follower reads up to the end of the topic
and hands over only the newest event for its model (older ones are history); after
that, every new event for its model is handed over as it arrives. Malformed events are
logged and skipped, and so is an event whose handler raises.

The same follower reads rollouts.v1 (also compacted by model) when canary rollouts are
on: pass `topic=ROLLOUTS, event_type=RolloutEvent`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from schemas.codec import InvalidEvent, decode
from schemas.events import ModelUpdateEvent
from schemas.topics import MODEL_UPDATES, Topic
from services.kafka.idle import EndPauses
from services.logs import event as log_event

log = logging.getLogger(__name__)


def newest_for_model(events: list[Any], model: str) -> Any:
    """The last event for `model` in topic order (what compaction will keep)."""
    for ev in reversed(events):
        if ev.model == model:
            return ev
    return None


class UpdateFollower:
    """A thread that reads model-updates.v1 (or another topic compacted by model) and calls
    `on_update` for this model's events."""

    def __init__(
        self,
        bootstrap: str,
        *,
        topic_prefix: str,
        model: str,
        replica_id: str,
        on_update: Callable[[Any], None],
        topic: Topic = MODEL_UPDATES,
        event_type: type = ModelUpdateEvent,
        idle_pause_ms: int = 0,
    ) -> None:
        self.bootstrap = bootstrap
        self.idle_pause_ms = idle_pause_ms
        """Pause a partition read to its end this long before fetching it again (`EndPauses`)."""
        self.topic = topic.full_name(topic_prefix)
        self.event_type = event_type
        self.model = model
        self.replica_id = replica_id
        self.on_update = on_update
        self.caught_up = threading.Event()
        """Set once the follower has read to the end of the topic at least once."""
        self.invalid_events = 0
        self.handler_failures = 0
        """Events whose `on_update` raised (logged; the follower went on)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-updates", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)

    def _hand_over(self, ev: Any) -> None:
        """Call `on_update`; a failure is logged and the follower goes on, so the next
        version still arrives (a dead follower would pin the replica to its version)."""
        try:
            self.on_update(ev)
        except Exception as exc:
            self.handler_failures += 1
            log_event(
                log,
                "model_update_handler_failed",
                logging.ERROR,
                event_id=getattr(ev, "event_id", None),
                error=f"{type(exc).__name__}: {exc}"[:500],
            )

    def _consumer(self) -> Any:
        from confluent_kafka import Consumer

        from services.kafka.security import librdkafka_config

        return Consumer(
            {
                **librdkafka_config(self.bootstrap),
                # A group id librdkafka requires; nothing is ever committed under it.
                "group.id": f"rlfeed-serving-{self.replica_id}-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
            }
        )

    def _take(self, msg: Any, backlog: list[Any]) -> None:
        """One message: handed over once caught up, else kept in `backlog`."""
        if msg.error() is not None:
            log_event(log, "model_updates_error", logging.WARNING, error=str(msg.error()))
            return
        try:
            ev = decode(self.event_type, msg.value() or b"")
        except InvalidEvent as exc:
            self.invalid_events += 1
            log_event(log, "model_update_invalid", logging.WARNING, offset=msg.offset(), error=str(exc))
            return
        if ev.model != self.model:
            return
        if self.caught_up.is_set():
            self._hand_over(ev)
        else:
            backlog.append(ev)

    def _assign(self, consumer: Any) -> int:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        while not self._stop.is_set():
            try:
                meta = consumer.list_topics(self.topic, timeout=5)
                topic = meta.topics.get(self.topic)
                if topic is not None and topic.error is None and topic.partitions:
                    parts = sorted(topic.partitions)
                    consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
                    return len(parts)
            except Exception as exc:  # broker not up yet: retry
                log_event(log, "model_updates_metadata_failed", logging.WARNING, error=str(exc))
            self._stop.wait(2.0)
        return 0

    def _run(self) -> None:
        consumer = self._consumer()
        pauses = EndPauses(consumer, self.idle_pause_ms)
        try:
            n_parts = self._assign(consumer)
            backlog: list[Any] = []
            while not self._stop.is_set():
                # One at a time: an update is handed over the moment it arrives (a batch
                # would wait out the timeout for more).
                for msg in pauses.consume(1, 0.1):
                    self._take(msg, backlog)
                if not self.caught_up.is_set() and len(pauses.ended) >= n_parts:
                    # Every partition read to its end once: the newest of the backlog is
                    # what serves; from here each update is handed over as it comes.
                    newest = newest_for_model(backlog, self.model)
                    backlog.clear()
                    self.caught_up.set()
                    newest_id = None if newest is None else newest.event_id
                    log_event(log, "model_updates_caught_up", topic=self.topic, newest=newest_id)
                    if newest is not None:
                        self._hand_over(newest)
        except Exception:
            log.exception("model_updates_follower_crashed")
            time.sleep(0)
        finally:
            consumer.close()
