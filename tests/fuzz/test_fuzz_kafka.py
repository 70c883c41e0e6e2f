"""Raw bytes written straight onto the topics (as kcat or any Kafka client would) and
consumed by the real stream worker and the real sink.

Nothing crashes, and every corpus input is dead-lettered exactly once per topic it was
written to, with a reason and its original bytes (a prefix, saying so, when the letter
would not fit the broker). Counts: inputs written, dead letters found.
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Producer

from schemas.codec import decode
from schemas.events import DeadLetterEvent
from schemas.topics import DLQ, FEEDBACK, GENERATIONS, JOIN_PARTITIONS, PUBLIC_TOPICS
from tests.fuzz.corpus_files import corpus
from tests.test_gateway_support import read_topic
from tests.test_streams_worker import Worker, fb, gen, produce, reader_for, samples_by_gen

pytestmark = pytest.mark.timeout(240)


def write_raw(bootstrap: str, writes: list[tuple[str, bytes, bytes]]) -> None:
    """Produce (topic, key, value) byte for byte, partitioned like kcat -X partitioner=murmur2_random."""
    producer = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random", "linger.ms": 5})
    for topic, key, value in writes:
        producer.produce(topic, value, key)
        producer.poll(0)
    assert producer.flush(60) == 0


def check_letters(letters: list[DeadLetterEvent], writes: list[tuple[str, bytes, bytes]], rejected_by: str) -> None:
    """Each write has exactly one letter from `rejected_by` (same topic and key) with its bytes."""
    mine = [d for d in letters if d.rejected_by == rejected_by]
    by_origin = Counter((d.source_topic, base64.b64decode(d.key_b64 or "")) for d in mine)
    for topic, key, value in writes:
        assert by_origin[(topic, key)] == 1, (topic, key, by_origin[(topic, key)])
        (d,) = [d for d in mine if d.source_topic == topic and base64.b64decode(d.key_b64 or "") == key]
        original = base64.b64decode(d.original_b64)
        assert d.reason, key
        assert original == value or (value.startswith(original) and "truncated" in d.reason), key


def test_stream_worker_dead_letters_every_raw_input(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    prefix = topic_prefix
    writes = [
        (topic.full_name(prefix), f"fz-{topic.name}-{name}".encode(), raw)
        for topic in (GENERATIONS, FEEDBACK)
        for name, raw in corpus()
    ]
    worker = Worker(kafka_bootstrap, prefix, f"g-{uuid.uuid4().hex[:8]}", tmp_path / "w.log")
    reader = reader_for(kafka_bootstrap, prefix)
    try:
        worker.wait_log("streams.assigned", lambda r: len(r["partitions"]) == JOIN_PARTITIONS)
        write_raw(kafka_bootstrap, writes)
        produce(kafka_bootstrap, prefix, [gen("fz-ok"), fb("fz-ok-a", "fz-ok", "accept")])
        dlq = DLQ.full_name(prefix)
        try:
            reader.wait(lambda: len(reader.messages[dlq]) >= len(writes), timeout_s=120, what="dead letters")
        except AssertionError:
            got = {orjson.loads(m.value())["key_b64"] for m in reader.messages[dlq]}
            missing = [k for _, k, _ in writes if base64.b64encode(k).decode() not in got]
            raise AssertionError(
                f"{len(missing)} inputs without a dead letter: {missing[:20]}\n{worker.log_path.read_text()[-3000:]}"
            ) from None
        reader.wait(lambda: "fz-ok" in samples_by_gen(reader, prefix), what="a sample after the hostile input")
        letters = [DeadLetterEvent.model_validate_json(m.value()) for m in reader.messages[dlq]]
        check_letters(letters, writes, "streams")
        print(
            "streams: raw inputs",
            len(writes),
            "dead letters",
            len(letters),
            "crashes",
            int(worker.proc.poll() is not None),
        )
        assert worker.proc.poll() is None, worker.log_path.read_text()[-3000:]
    finally:
        reader.close()
        worker.stop()


def test_sink_dead_letters_every_raw_input_on_every_topic(kafka_bootstrap: str, topic_prefix: str, clickhouse) -> None:
    from services.sink.settings import SinkSettings
    from services.sink.worker import Sink

    prefix = topic_prefix
    writes = [
        (topic.full_name(prefix), f"fz-{topic.name}-{name}".encode(), raw)
        for topic in PUBLIC_TOPICS
        for name, raw in corpus()
    ]
    write_raw(kafka_bootstrap, writes)
    settings = SinkSettings(topic_prefix=prefix, sink_batch_max_wait_s=0.2, sink_retry_max_s=1.0)
    sink = Sink(settings, kafka_bootstrap, clickhouse)
    stop = threading.Event()
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            sink.run(stop)
        except BaseException as exc:  # the test's subject: record, do not hide
            crashed.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not crashed:
            rows = int(clickhouse.command("SELECT count() FROM dead_letters FINAL"))
            if rows >= len(writes):
                break
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(30)
        sink.close()
    assert not crashed, f"the sink crashed: {crashed[0]!r}"
    total = int(clickhouse.command("SELECT count() FROM dead_letters"))
    distinct = int(clickhouse.command("SELECT uniqExact(source_topic, event_id) FROM dead_letters"))
    final = int(clickhouse.command("SELECT count() FROM dead_letters FINAL"))
    print("sink: raw inputs", len(writes), "dead letters rows", total, "distinct", distinct)
    assert final == distinct == len(writes)
    result = clickhouse.query("SELECT source_topic, key_b64, original_b64, reason, rejected_by FROM dead_letters FINAL")
    letters = [
        DeadLetterEvent(source_topic=t, key_b64=k, original_b64=o, reason=r, rejected_by=b)
        for t, k, o, r, b in result.result_rows
    ]
    check_letters(letters, writes, "sink")
    # what the sink produced to dlq.v1 is what it inserted (none lost on the way)
    # (dlq.v1 also holds the raw corpus written to it: only the letters the sink produced)
    raw_on_dlq = {raw for name, _, raw in writes if name == DLQ.full_name(prefix)}
    produced = [
        decode(DeadLetterEvent, value)
        for _, value in read_topic(kafka_bootstrap, DLQ.full_name(prefix))
        if value not in raw_on_dlq
    ]
    produced_sink = [d for d in produced if d.rejected_by == "sink"]
    assert len(produced_sink) == len(writes) - len(corpus())
