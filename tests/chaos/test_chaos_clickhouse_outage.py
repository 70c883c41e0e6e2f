"""ClickHouse unavailable to the sink for a while, then back (the real sink, the real
broker, chdb behind a client that refuses every insert while the outage lasts).

chdb cannot listen on HTTP (shared/notes/infrastructure.md), so the outage is a client
wrapper rather than a refused port. During it the sink retries and commits nothing;
afterwards every event is in ClickHouse exactly once, and a sink killed mid-outage
leaves nothing lost to its successor."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.codec import encode
from schemas.events import FeedbackEvent, now_ms
from schemas.topics import FEEDBACK, PUBLIC_TOPICS

pytestmark = [pytest.mark.timeout(300), pytest.mark.chaos]


class Outage:
    """A ClickHouse client whose inserts fail while `down` is set (reads pass through)."""

    def __init__(self, client) -> None:
        self.client = client
        self.down = threading.Event()
        self.refused = 0

    def raw_insert(self, *args, **kwargs):
        if self.down.is_set():
            self.refused += 1
            raise ConnectionRefusedError("ClickHouse unavailable (chaos)")
        return self.client.raw_insert(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.client, name)


def _committed(bootstrap: str, group: str, prefix: str) -> int:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = [TopicPartition(t.full_name(prefix), p) for t in PUBLIC_TOPICS for p in range(t.partitions)]
        return sum(max(tp.offset, 0) for tp in c.committed(parts, timeout=10))
    finally:
        c.close()


def _feedback(run: str, n: int, start: int = 0) -> list[FeedbackEvent]:
    return [
        FeedbackEvent(
            event_id=f"{run}-{i}", event_time_ms=now_ms(), generation_id=f"{run}-g{i}", kind="accept", user_id="u"
        )
        for i in range(start, start + n)
    ]


def _produce(bootstrap: str, prefix: str, events: list[FeedbackEvent]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 5})
    for e in events:
        p.produce(FEEDBACK.full_name(prefix), encode(e), e.generation_id.encode())
    assert p.flush(30) == 0


def _run(sink, stop: threading.Event, errors: list) -> threading.Thread:
    def loop() -> None:
        try:
            sink.run(stop)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    return t


def _wait(cond, what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_sink_rides_out_a_clickhouse_outage_and_a_restart_during_it(
    kafka_bootstrap: str, topic_prefix: str, clickhouse
) -> None:
    from services.sink.settings import SinkSettings
    from services.sink.worker import Sink

    prefix, run = topic_prefix, uuid.uuid4().hex[:6]
    settings = SinkSettings(
        topic_prefix=prefix,
        sink_batch_max_wait_s=0.2,
        sink_retry_initial_s=0.1,
        sink_retry_max_s=0.5,
        sink_group_instance_id=f"sink-{run}",
        sink_session_timeout_s=6,
        sink_max_poll_interval_s=10,
    )
    group = f"{prefix}{settings.sink_group_id}"
    outage = Outage(clickhouse)
    errors: list = []
    first = Sink(settings, kafka_bootstrap, outage)
    stop1 = threading.Event()
    t1 = _run(first, stop1, errors)
    _produce(kafka_bootstrap, prefix, _feedback(run, 100))
    _wait(lambda: int(clickhouse.command("SELECT count() FROM feedback FINAL")) == 100, "the first 100")
    # the commit follows the insert: wait for it, or the outage below races it
    _wait(lambda: _committed(kafka_bootstrap, group, prefix) == 100, "the first 100 committed")
    committed_before = _committed(kafka_bootstrap, group, prefix)

    outage.down.set()
    _produce(kafka_bootstrap, prefix, _feedback(run, 200, start=100))
    _wait(lambda: outage.refused >= 3, "retries against the outage")
    assert first.stats.insert_failures >= 3
    assert _committed(kafka_bootstrap, group, prefix) == committed_before  # nothing committed while down
    # the sink dies in the middle of the outage (no clean shutdown of its batch)
    stop1.set()
    t1.join(30)
    first.consumer.close()

    outage.down.clear()
    second = Sink(settings, kafka_bootstrap, clickhouse)
    stop2 = threading.Event()
    t2 = _run(second, stop2, errors)
    try:
        _wait(lambda: int(clickhouse.command("SELECT count() FROM feedback FINAL")) == 300, "all 300 after the outage")
    finally:
        stop2.set()
        t2.join(30)
        second.close()
    assert not errors, errors
    rows = int(clickhouse.command("SELECT count() FROM feedback"))
    final = int(clickhouse.command("SELECT count() FROM feedback FINAL"))
    distinct = int(clickhouse.command("SELECT uniqExact(event_id) FROM feedback"))
    print("outage: refused inserts", outage.refused, "rows", rows, "final", final, "distinct", distinct)
    assert final == distinct == 300
