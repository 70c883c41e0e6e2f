"""The sink's pipelined loop (`Sink.run`) through a real broker and chdb.

- Valid events go through the fast decoder; input it refuses is decided by the
  reference decoder: lax-but-valid input lands, invalid input is dead-lettered with the
  field named, and the dead letter reaches the dead_letters table through dlq.v1.
- Batch N+1 is polled while batch N is inserted, but N's offsets are committed only
  after N's insert returned: with the insert held, nothing is committed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.codec import encode
from schemas.events import ReplicaStatusEvent
from schemas.topics import FEEDBACK, GENERATIONS, PUBLIC_TOPICS, REPLICA_STATUS
from services.kafka.producers import producer_config
from services.sink.settings import SinkSettings
from services.sink.worker import Sink
from tests.factories import feedback, generation


def _settings(prefix: str, **kw: object) -> SinkSettings:
    return SinkSettings(
        topic_prefix=prefix,
        sink_group_id=f"sink-{uuid.uuid4().hex[:8]}",
        sink_batch_max_wait_s=0.2,
        sink_retry_initial_s=0.05,
        **kw,
    )


def _produce(bootstrap: str, messages: list[tuple[str, bytes | None, bytes]]) -> None:
    producer = Producer({**producer_config(bootstrap), "acks": "all"})
    for topic, key, value in messages:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    """A fail-safe deadline for a condition the sink makes true; not a timing assertion."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


def _count(client, table: str, where: str = "1") -> int:
    return int(client.command(f"SELECT count() FROM {table} FINAL WHERE {where}"))


def test_run_lands_valid_input_and_dead_letters_invalid_input_naming_the_field(
    kafka_bootstrap: str, topic_prefix: str, clickhouse
) -> None:
    gens, fbs = GENERATIONS.full_name(topic_prefix), FEEDBACK.full_name(topic_prefix)
    lax = orjson.loads(encode(generation("g-lax")))
    lax["policy_version"] = "3"  # the model's lax mode takes it; msgspec does not
    wrong_type = orjson.loads(encode(generation("g-bad")))
    wrong_type["policy_version"] = "three"
    messages = [(gens, f"g-{i}".encode(), encode(generation(f"g-{i}", policy_version=i))) for i in range(20)]
    messages += [(fbs, b"g-1", encode(feedback("g-1", kind="rating", value=float(1 + i % 5)))) for i in range(20)]
    messages += [
        (
            REPLICA_STATUS.full_name(topic_prefix),
            b"r",
            encode(ReplicaStatusEvent(replica_id="r", model="m", version=1, state="serving", engine="vllm")),
        ),
        (gens, b"g-lax", orjson.dumps(lax)),
        (gens, b"g-bad", orjson.dumps(wrong_type)),
        (fbs, b"g-1", orjson.dumps(orjson.loads(encode(feedback("g-1", kind="rating", value=4.0))) | {"value": 9})),
        (fbs, b"g-1", b"{not json"),
    ]
    _produce(kafka_bootstrap, messages)

    sink = Sink(_settings(topic_prefix), kafka_bootstrap, clickhouse)
    stop = threading.Event()
    runner = threading.Thread(target=sink.run, args=(stop,))
    runner.start()
    try:
        # 3 dead letters come back through dlq.v1: every message, theirs included, committed.
        _wait(lambda: sink.stats.messages == len(messages) + 3, "every message committed")
        _wait(lambda: _count(clickhouse, "dead_letters") == 3, "the dead letters inserted")
    finally:
        stop.set()
        runner.join(60)
        sink.close()
    assert not runner.is_alive()

    assert _count(clickhouse, "generations") == 21
    assert _count(clickhouse, "generations", "generation_id = 'g-lax' AND policy_version = 3") == 1
    assert _count(clickhouse, "feedback") == 20
    assert _count(clickhouse, "replica_status") == 1
    letters = clickhouse.query(
        "SELECT source_topic, error_field, reason, rejected_by FROM dead_letters FINAL"
        " ORDER BY source_topic, error_field NULLS FIRST"
    ).result_rows
    assert [(r[0], r[1], r[3]) for r in letters] == [
        (fbs, None, "sink"),
        (fbs, "value", "sink"),
        (gens, "policy_version", "sink"),
    ]
    assert "invalid JSON" in letters[0][2] and "rating" in letters[1][2]
    # The four refused by the fast decoder (and only those) took the slow path; the three
    # dead letters read back from dlq.v1 were valid events.
    assert sink.stats.slow_path == 4
    assert sink.stats.dead_letters == 3


class _HeldClient:
    """A ClickHouse client whose first insert waits until `release` is set."""

    def __init__(self, client) -> None:
        self.client = client
        self.entered = threading.Event()
        self.release = threading.Event()
        self.inserts = 0

    def raw_insert(self, *args, **kwargs):
        self.inserts += 1
        if self.inserts == 1:
            self.entered.set()
            assert self.release.wait(120)
        return self.client.raw_insert(*args, **kwargs)


def _committed(bootstrap: str, group: str, prefix: str) -> int:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        meta = consumer.list_topics(timeout=10).topics
        parts = [
            TopicPartition(t.full_name(prefix), p) for t in PUBLIC_TOPICS for p in meta[t.full_name(prefix)].partitions
        ]
        return sum(max(tp.offset, 0) for tp in consumer.committed(parts, timeout=10))
    finally:
        consumer.close()


def test_run_commits_a_batch_only_after_its_insert_while_the_next_is_polled(
    kafka_bootstrap: str, topic_prefix: str, clickhouse
) -> None:
    fbs = FEEDBACK.full_name(topic_prefix)
    settings = _settings(topic_prefix)
    group = f"{topic_prefix}{settings.sink_group_id}"
    held = _HeldClient(clickhouse)
    sink = Sink(settings, kafka_bootstrap, held)
    stop = threading.Event()
    runner = threading.Thread(target=sink.run, args=(stop,))
    runner.start()
    try:
        _produce(kafka_bootstrap, [(fbs, b"g-1", encode(feedback("g-1", kind="copy", value=None)))])
        _wait(held.entered.is_set, "the first insert")
        # While the first batch's insert is held, the loop goes on polling: a second batch
        # is read, but neither is committed, and nothing is in ClickHouse yet.
        _produce(kafka_bootstrap, [(fbs, b"g-2", encode(feedback("g-2", kind="copy", value=None)))])
        time.sleep(1.0)  # gives the loop time to poll; the assertions do not depend on it
        assert _committed(kafka_bootstrap, group, topic_prefix) == 0
        assert sink.stats.messages == 0
        assert _count(clickhouse, "feedback") == 0
        held.release.set()
        _wait(lambda: sink.stats.messages == 2, "both batches committed")
        assert _committed(kafka_bootstrap, group, topic_prefix) == 2
    finally:
        held.release.set()
        stop.set()
        runner.join(60)
        sink.close()
    assert _count(clickhouse, "feedback") == 2


class _DownClient:
    """ClickHouse unavailable: every insert raises."""

    def __init__(self) -> None:
        self.failures = 0

    def raw_insert(self, *args, **kwargs):
        self.failures += 1
        raise ConnectionError("ClickHouse unavailable")


def test_run_stopped_during_an_outage_commits_nothing_and_the_next_sink_delivers(
    kafka_bootstrap: str, topic_prefix: str, clickhouse
) -> None:
    fbs = FEEDBACK.full_name(topic_prefix)
    settings = _settings(topic_prefix, sink_retry_max_s=0.1)
    _produce(kafka_bootstrap, [(fbs, b"g-1", encode(feedback("g-1", kind="copy", value=None)))])
    down = _DownClient()
    sink = Sink(settings, kafka_bootstrap, down)
    stop = threading.Event()
    runner = threading.Thread(target=sink.run, args=(stop,))
    runner.start()
    try:
        _wait(lambda: down.failures >= 3, "retries against the outage")
    finally:
        stop.set()
        runner.join(60)
        sink.close()
    assert not runner.is_alive()
    assert sink.stats.messages == 0 and sink.stats.insert_failures >= 3

    again = Sink(settings, kafka_bootstrap, clickhouse)
    stop = threading.Event()
    runner = threading.Thread(target=again.run, args=(stop,))
    runner.start()
    try:
        _wait(lambda: again.stats.messages == 1, "the redelivered message committed")
    finally:
        stop.set()
        runner.join(60)
        again.close()
    assert _count(clickhouse, "feedback") == 1


def test_a_fenced_sink_replaces_its_consumer_and_lands_what_comes_after(
    kafka_bootstrap: str, topic_prefix: str, clickhouse
) -> None:
    """A second member with the sink's static id fences it (as after a broker restart):
    librdkafka hands `consume()` a `_FATAL` error without the fatal flag, and the sink must
    still see it as fatal, replace its consumer, and land the events that follow."""
    gens = GENERATIONS.full_name(topic_prefix)
    settings = _settings(topic_prefix, sink_group_instance_id=f"static-{uuid.uuid4().hex[:6]}")
    sink = Sink(settings, kafka_bootstrap, clickhouse)
    stop = threading.Event()
    runner = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    runner.start()
    try:
        _produce(kafka_bootstrap, [(gens, b"f-0", encode(generation("f-0")))])
        _wait(lambda: _count(clickhouse, "generations", "generation_id = 'f-0'") == 1, "the first event landed")
        intruder = Consumer(
            {
                **producer_config(kafka_bootstrap),
                "group.id": f"{topic_prefix}{settings.sink_group_id}",
                "group.instance.id": settings.sink_group_instance_id,
                "session.timeout.ms": 6000,
            }
        )
        intruder.subscribe([t.full_name(topic_prefix) for t in PUBLIC_TOPICS])
        intruder.consume(10, 3.0)
        intruder.close()  # leaves the group: the sink's new consumer takes every partition
        _wait(lambda: sink.stats.consumer_renewals >= 1, "the fenced consumer replaced")
        _produce(kafka_bootstrap, [(gens, f"f-{i}".encode(), encode(generation(f"f-{i}"))) for i in range(1, 6)])
        _wait(
            lambda: _count(clickhouse, "generations", "startsWith(generation_id, 'f-')") == 6,
            "the events after the fence landed",
        )
    finally:
        stop.set()
        runner.join(30)
        sink.close()
