"""Following rollbacks: which version the trainer builds on after an operator's or a
canary rollout's rollback.

The trainer's weights descend from one published version (its parent, `published_version`
in its checkpoint), adopted at a time (`lineage_since_ms`: when it published that version,
or when it followed a rollback to it). Two events abandon that lineage:

* model-updates.v1 with `rollback: true` (`rlfeed rollback VERSION`): VERSION is served
  again; the trainer reloads it unless it already builds on it;
* rollouts.v1 with `decision: rollback`: the candidate `arms["rollout.decided_version"]`
  was dropped and `stable_version` is served; the trainer reloads `stable_version` when
  the dropped version is its parent or one of the parent's ancestors.

Only events newer than `lineage_since_ms` count, so replaying both compacted topics
from the beginning at start is safe: a rollback the trainer already followed, or one
older than the version it published since, does nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from schemas.codec import InvalidEvent, decode
from schemas.events import ModelUpdateEvent, RolloutDecision, RolloutEvent
from schemas.topics import MODEL_UPDATES, ROLLOUTS
from services.kafka.idle import EndPauses
from services.kafka.security import librdkafka_config
from services.logs import event
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


def ancestry(version: int, parent_of: Callable[[int], int | None], limit: int = 10_000) -> list[int]:
    """`version`, its parent, the parent's parent, ... (a cycle or `limit` ends it)."""
    out, seen = [version], {version}
    while len(out) < limit:
        p = parent_of(out[-1])
        if p is None or p in seen:
            break
        out.append(p)
        seen.add(p)
    return out


def rollback_target(ev: ModelUpdateEvent | RolloutEvent, model: str, lineage: list[int], since_ms: int) -> int | None:
    """The version the trainer must reload because of `ev`, or None.

    `lineage` is the trainer's parent version first, then its ancestors; `since_ms` is
    when the trainer adopted that parent (older events are history)."""
    if ev.model != model or ev.event_time_ms <= since_ms or not lineage:
        return None
    if isinstance(ev, ModelUpdateEvent):
        return ev.version if ev.rollback and ev.version != lineage[0] else None
    if ev.decision != RolloutDecision.ROLLBACK:
        return None
    dropped = ev.arms.get("rollout.decided_version")
    if dropped is None or int(dropped) not in lineage or ev.stable_version == lineage[0]:
        return None
    return ev.stable_version


class UpdateWatcher:
    """Reads model-updates.v1 and rollouts.v1 from the beginning, without blocking:
    `poll()` returns the decodable events that arrived since the last call (bad ones
    are logged and skipped: other services own those topics and their dead letters)."""

    def __init__(self, settings: TrainerSettings, bootstrap: str) -> None:
        self.topics = {
            MODEL_UPDATES.full_name(settings.topic_prefix): ModelUpdateEvent,
            ROLLOUTS.full_name(settings.topic_prefix): RolloutEvent,
        }
        self.consumer = Consumer(
            {
                **librdkafka_config(bootstrap, settings),
                "group.id": f"{settings.topic_prefix}{settings.trainer_group_id}-lineage",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,  # for EndPauses
            }
        )
        self.pauses = EndPauses(self.consumer, settings.kafka_idle_pause_ms)
        assignment = []
        for topic in self.topics:
            meta = self.consumer.list_topics(topic, timeout=30)
            parts = meta.topics[topic].partitions if topic in meta.topics else {}
            assignment += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(parts)]
        self.assignment = assignment
        self.consumer.assign(assignment)

    def poll(self, timeout_s: float = 0.0, max_messages: int = 500) -> list[ModelUpdateEvent | RolloutEvent]:
        out: list[ModelUpdateEvent | RolloutEvent] = []
        for msg in self.pauses.consume(max_messages, timeout_s):
            err = msg.error()
            if err is not None:
                event(log, "lineage_consume_error", logging.WARNING, error=str(err))
                continue
            kind = self.topics.get(msg.topic())
            if kind is None:
                continue
            try:
                out.append(decode(kind, msg.value() or b""))
            except InvalidEvent as exc:
                event(
                    log,
                    "lineage_event_invalid",
                    logging.WARNING,
                    topic=msg.topic(),
                    offset=msg.offset(),
                    error=str(exc),
                )
        return out

    def catch_up(self, timeout_s: float = 10.0) -> list[ModelUpdateEvent | RolloutEvent]:
        """Everything up to the end offsets as of now (for the start)."""
        ends = {}
        for tp in self.assignment:
            _, hi = self.consumer.get_watermark_offsets(tp, timeout=10)
            ends[(tp.topic, tp.partition)] = hi
        out: list[ModelUpdateEvent | RolloutEvent] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            positions = {(tp.topic, tp.partition): tp.offset for tp in self.consumer.position(self.assignment)}
            if all(ends[k] <= 0 or positions.get(k, -1) >= ends[k] for k in ends):
                break
            out += self.poll(0.2)
        return out

    def close(self) -> None:
        self.consumer.close()
