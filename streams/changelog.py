"""The join's compacted changelog: how state is written, read back and rebuilt.

One changelog partition mirrors one join partition (same index). The key is the
generation id; the value is the key's whole state (the generation and feedback as their
original JSON, plus times and the last sample id), or a tombstone when the key leaves the
state (orphans expired, settled keys forgotten after `correction_window_s`). The key
`META_KEY` holds the partition's event clock. Compaction keeps the last value per key, so
replaying a partition from its start rebuilds exactly the state that was last written.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

import orjson
from confluent_kafka import Consumer, KafkaException, TopicPartition

from schemas.fast import decode_feedback, decode_generation
from schemas.topics import JOIN_CHANGELOG
from services.kafka.security import librdkafka_config
from streams.join import META_KEY, Entry, JoinConfig, PartitionState


def changelog_topic(prefix: str) -> str:
    """The changelog topic's name on the broker."""
    return JOIN_CHANGELOG.full_name(prefix)


def encode_entry(e: Entry) -> bytes:
    """The changelog value of one key's state."""
    return orjson.dumps(
        {
            "g": None if e.gen_raw is None else orjson.Fragment(e.gen_raw),
            "f": [orjson.Fragment(r) for r in e.fb_raw],
            "c": e.created_ms,
            "ff": e.first_fb_ms,
            "sm": e.settled_ms,
            "sid": e.sample_id,
        }
    )


def encode_meta(st: PartitionState) -> bytes:
    """The changelog value of the partition's clock."""
    return orjson.dumps({"clock": st.max_event_ms})


def decode_entry(value: bytes) -> Entry:
    """Rebuild one key's state from its changelog value."""
    obj = orjson.loads(value)
    e = Entry(obj["c"])
    if obj["g"] is not None:
        e.gen_raw = orjson.dumps(obj["g"])
        e.gen = decode_generation(e.gen_raw)
    for f in obj["f"]:
        raw = orjson.dumps(f)
        e.add_feedback(decode_feedback(raw), raw)
    e.first_fb_ms = obj["ff"]
    e.settled_ms = obj["sm"]
    e.sample_id = obj["sid"]
    return e


def restore(
    partition: int, records: Iterable[tuple[bytes, bytes | None]], cfg: JoinConfig, wall_ms: int
) -> PartitionState:
    """The state of one partition after replaying its changelog records in order."""
    latest: dict[bytes, bytes | None] = {}
    for key, value in records:
        latest[key] = value
    st = PartitionState(partition)
    meta = latest.pop(META_KEY, None)
    if meta is not None:
        st.max_event_ms = orjson.loads(meta)["clock"]
    st.wall_at_max_ms = wall_ms
    entries = [(key.decode(), decode_entry(value)) for key, value in latest.items() if value is not None]
    for gid, e in sorted((x for x in entries if x[1].settled_ms is None), key=lambda x: x[1].created_ms):
        st.pending[gid] = e
        st.schedule(gid, e, cfg)
    for gid, e in sorted((x for x in entries if x[1].settled_ms is not None), key=lambda x: x[1].settled_ms or 0):
        st.settled[gid] = e
    return st


def read_partitions(bootstrap: str, topic: str, partitions: list[int], timeout_s: float) -> dict[int, list]:
    """Every record of the given changelog partitions, from the start to the current end.

    Uses its own group-less consumer (assign, no commits). Raises TimeoutError when the
    end is not reached within `timeout_s`.
    """
    out: dict[int, list[tuple[bytes, bytes | None]]] = {p: [] for p in partitions}
    if not partitions:
        return out
    consumer = Consumer(
        {
            **librdkafka_config(bootstrap),
            "group.id": f"rlfeed-restore-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
        }
    )
    try:
        remaining: dict[int, int] = {}
        assign = []
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
            if high > low:
                remaining[p] = high
                assign.append(TopicPartition(topic, p, low))
        if not assign:
            return out
        consumer.assign(assign)
        deadline = time.monotonic() + timeout_s
        while remaining:
            if time.monotonic() > deadline:
                raise TimeoutError(f"changelog {topic} partitions {sorted(remaining)} not read within {timeout_s} s")
            for msg in consumer.consume(num_messages=10_000, timeout=0.5):
                if msg.error():
                    raise KafkaException(msg.error())
                p = msg.partition()
                out[p].append((msg.key(), msg.value()))
                if p in remaining and msg.offset() >= remaining[p] - 1:
                    del remaining[p]
        return out
    finally:
        consumer.close()
