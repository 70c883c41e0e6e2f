"""An idle librdkafka consumer with `EndPauses` fetches a few times a second, not thousands
(the embedded broker answers empty fetches at once), and still gets what arrives later."""

from __future__ import annotations

import json
import time
import uuid

from services.kafka.idle import EndPauses
from services.kafka.producers import producer_config
from services.kafka.topics import admin


def _fetch_requests(stats: list[dict]) -> int:
    """Fetch requests sent to the brokers, from the latest librdkafka statistics."""
    latest = stats[-1]
    return sum(int(b.get("req", {}).get("Fetch", 0)) for b in latest["brokers"].values())


def _idle_fetches(bootstrap: str, topic: str, pause_ms: int, seconds: float) -> tuple[int, list[bytes]]:
    """Fetch requests of a consumer that reads `topic` to its end and idles there for
    `seconds`, and the messages it got, including one produced halfway."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

    stats: list[dict] = []
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"idle-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "statistics.interval.ms": 200,
            "stats_cb": lambda s: stats.append(json.loads(s)),
        }
    )
    producer = Producer(producer_config(bootstrap))
    pauses = EndPauses(consumer, pause_ms)
    got: list[bytes] = []
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        start, produced_late = time.monotonic(), False
        before: int | None = None
        while time.monotonic() - start < seconds:
            if not produced_late and time.monotonic() - start > seconds / 2:
                producer.produce(topic, b"late")
                producer.flush(10)
                produced_late = True
            got.extend(m.value() for m in pauses.consume(10, 0.1) if m.error() is None)
            if before is None and pauses.ended and stats:
                before = _fetch_requests(stats)  # at the end once: idling from here
        deadline = time.monotonic() + 10
        while not stats and time.monotonic() < deadline:
            consumer.poll(0.1)
        return _fetch_requests(stats) - (before or 0), got
    finally:
        consumer.close()


def _new_topic(bootstrap: str) -> str:
    """A fresh one-partition topic."""
    from confluent_kafka.admin import NewTopic

    topic = f"idle-{uuid.uuid4().hex[:10]}"
    client = admin(bootstrap)  # kept: the future fails if its client is freed first
    client.create_topics([NewTopic(topic, num_partitions=1, replication_factor=-1)])[topic].result(30)
    return topic


def test_an_idle_consumer_with_end_pauses_barely_fetches_and_misses_nothing(kafka_bootstrap: str) -> None:
    from confluent_kafka import Producer

    topic = _new_topic(kafka_bootstrap)
    producer = Producer(producer_config(kafka_bootstrap))
    producer.produce(topic, b"first")
    assert producer.flush(10) == 0

    fetches, got = _idle_fetches(kafka_bootstrap, topic, pause_ms=250, seconds=4.0)
    assert got == [b"first", b"late"]
    # A long-polling broker answers about twice a second per partition; a pause of 250 ms
    # caps it near four a second either way, plus the fetches sent between an EOF and its
    # pause, which grow on a loaded machine (84 in one CI run). The embedded broker without
    # pauses: 35k-110k in the same time (through consume / poll).
    assert fetches < 600, fetches


def test_a_pause_at_the_first_end_after_assignment_loses_nothing_fetched_meanwhile(kafka_bootstrap: str) -> None:
    """A pause drops what the consumer fetched but the application has not seen, and the
    fetch restarts from the application's position; before the first message after an
    assignment that position is unset, and librdkafka restarts from the assignment's start
    (rd_kafka_toppar_pause_resume, session 7): nothing fetched between the EOF and the
    pause is lost."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

    topic = _new_topic(kafka_bootstrap)
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"idle-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    pauses = EndPauses(consumer, 250)
    try:
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + 30
        end = None
        while end is None and time.monotonic() < deadline:
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is not None and msg.error().code() == KafkaError._PARTITION_EOF:
                end = msg
        assert end is not None
        producer = Producer(producer_config(kafka_bootstrap))
        for i in range(5):
            producer.produce(topic, str(i).encode())
        assert producer.flush(10) == 0
        time.sleep(1.0)  # the consumer's fetcher queues them before the application sees the end
        pauses.reached_end(end.topic(), end.partition())
        assert pauses.ended == {(topic, 0)}
        got: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(got) < 5 and time.monotonic() < deadline:
            got.extend(m.value() for m in pauses.consume(10, 0.1))
        assert got == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        consumer.close()
