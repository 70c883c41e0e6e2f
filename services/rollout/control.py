"""Reading the rollout state from Kafka and the operators' actions (thin I/O + pure builders).

`read_latest` reads a topic compacted by model (rollouts.v1) from its start to its end
and keeps each model's last event; `read_samples_since` re-reads samples.v1 from a point
in time (the broker's time index), so the streams worker can recount a running
rollout's arms exactly after a restart. `operator_event` builds the promote / abort
events of `rlfeed rollout`; they go on rollouts.v1 like the worker's own decisions, and
the worker adopts them when it reads them back.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from typing import Any, TypeVar

from schemas.codec import InvalidEvent, decode, encode, key_of
from schemas.events import Event, RolloutDecision, RolloutEvent, SampleEvent
from schemas.topics import ROLLOUTS
from services.rollout.arms import ARMS, WILSON_Z, decode_arm, wilson_interval

E = TypeVar("E", bound=Event)

OPERATOR_ACTIONS = ("promote", "abort")


def _consumer(bootstrap: str) -> Any:
    from confluent_kafka import Consumer

    from services.kafka.security import librdkafka_config

    return Consumer(
        {
            **librdkafka_config(bootstrap),
            # Assigned, never subscribed: nothing is committed under this id.
            "group.id": f"rlfeed-rollout-reader-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
        }
    )


def _read(
    consumer: Any, topic: str, starts: dict[int, int], event_type: type[E], deadline: float
) -> list[tuple[E, int]]:
    """Events of `topic` from `starts[partition]` to each partition's end when called, with offsets."""
    from confluent_kafka import TopicPartition

    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in starts}
    todo = {p for p in starts if starts[p] < ends[p]}
    consumer.assign([TopicPartition(topic, p, starts[p]) for p in todo])
    out: list[tuple[E, int]] = []
    while todo and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is None or msg.error() is not None:
            continue
        with contextlib.suppress(InvalidEvent):  # a malformed event is not ours to count
            out.append((decode(event_type, msg.value() or b""), msg.offset()))
        if msg.offset() + 1 >= ends[msg.partition()]:
            todo.discard(msg.partition())
    if todo:
        raise TimeoutError(f"{topic}: partitions {sorted(todo)} not read to their end in time")
    return out


def _partitions(consumer: Any, topic: str) -> list[int]:
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        raise RuntimeError(f"{topic}: no such topic")
    return sorted(meta.partitions)


def read_latest(bootstrap: str, topic: str, timeout_s: float = 30.0) -> dict[str, tuple[RolloutEvent, int]]:
    """Each model's last rollout event on the compacted `topic`, with its offset."""
    consumer = _consumer(bootstrap)
    try:
        parts = _partitions(consumer, topic)
        starts = {p: consumer.get_watermark_offsets(_tp(topic, p), timeout=10)[0] for p in parts}
        events = _read(consumer, topic, starts, RolloutEvent, time.monotonic() + timeout_s)
    finally:
        consumer.close()
    return {ev.model: (ev, offset) for ev, offset in events}


def read_samples_since(bootstrap: str, topic: str, since_ms: int, timeout_s: float = 60.0) -> list[SampleEvent]:
    """The samples written to `topic` at or after `since_ms` (broker timestamps), to the end."""
    consumer = _consumer(bootstrap)
    try:
        parts = _partitions(consumer, topic)
        found = consumer.offsets_for_times([_tp(topic, p, since_ms) for p in parts], timeout=10)
        starts = {}
        for tp in found:
            end = consumer.get_watermark_offsets(_tp(topic, tp.partition), timeout=10)[1]
            starts[tp.partition] = tp.offset if tp.offset >= 0 else end
        return [ev for ev, _ in _read(consumer, topic, starts, SampleEvent, time.monotonic() + timeout_s)]
    finally:
        consumer.close()


def _tp(topic: str, partition: int, offset: int = -1001) -> Any:
    from confluent_kafka import TopicPartition

    return TopicPartition(topic, partition, offset)


def publish(bootstrap: str, prefix: str, events: list[RolloutEvent], timeout_s: float = 30.0) -> None:
    """Write rollout events to rollouts.v1 in order (keyed by model) and wait for the broker."""
    from confluent_kafka import Producer

    from services.kafka.producers import producer_config

    producer = Producer(producer_config(bootstrap))
    for ev in events:
        producer.produce(ROLLOUTS.full_name(prefix), value=encode(ev), key=key_of(ev, ROLLOUTS.key))
    if producer.flush(timeout_s) != 0:
        raise TimeoutError("rollouts.v1: the broker did not acknowledge the events in time")


def operator_event(current: RolloutEvent, action: str, operator_reason: str = "") -> RolloutEvent:
    """The event of an operator's `promote` (the candidate becomes stable) or `abort` (it is dropped).

    Raises ValueError when no rollout runs. The pending version, if any, is kept for the
    streams worker to start next."""
    if action not in OPERATOR_ACTIONS:
        raise ValueError(f"action: expected one of {OPERATOR_ACTIONS}, got {action!r}")
    if current.candidate_version is None:
        raise ValueError(f"model {current.model}: no rollout is running (stable is {current.stable_version})")
    candidate = current.candidate_version
    promote = action == "promote"
    arms = {k: v for k, v in current.arms.items() if not k.startswith("stat.")}
    arms["rollout.decided_version"] = float(candidate)
    return RolloutEvent(
        model=current.model,
        stable_version=candidate if promote else current.stable_version,
        candidate_version=None,
        candidate_traffic=0.0,
        decision=RolloutDecision.PROMOTE if promote else RolloutDecision.ROLLBACK,
        reason=f"operator {action} of version {candidate}" + (f": {operator_reason}" if operator_reason else ""),
        arms=arms,
        tenant_id=current.tenant_id,
    )


def status_row(ev: RolloutEvent) -> dict[str, Any]:
    """A model's rollout as a JSON-able dict: split, decision, and each arm with its 95% interval."""
    arms = {}
    for name in ARMS:
        arm = decode_arm(ev.arms, name)
        low, high = wilson_interval(arm.successes, arm.n, WILSON_Z)
        arms[name] = {
            "n": arm.n,
            "successes": arm.successes,
            "rate": round(arm.rate, 4),
            "interval_95": [round(low, 4), round(high, 4)],
            "mean_tokens": round(arm.mean_tokens, 1),
            "requests": arm.requests,
            "failures": arm.failures,
            "error_rate": round(arm.error_rate, 4),
            "latency_p95_ms": round(arm.latency_p95_ms, 1),
        }
    stats = {k.removeprefix("stat."): round(v, 4) for k, v in ev.arms.items() if k.startswith("stat.")}
    pending = ev.arms.get("rollout.pending_version", -1.0)
    return {
        "model": ev.model,
        "stable_version": ev.stable_version,
        "candidate_version": ev.candidate_version,
        "pending_version": None if pending < 0 else int(pending),
        "candidate_traffic": ev.candidate_traffic,
        "decision": str(ev.decision),
        "reason": ev.reason,
        "event_time_ms": ev.event_time_ms,
        "arms": arms,
        "statistic": stats,
    }
