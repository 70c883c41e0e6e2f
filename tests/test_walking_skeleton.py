"""Walking skeleton: events produced with aiokafka and with kcat arrive, validate, and
land in ClickHouse through the sink; invalid input reaches dlq.v1 and dead_letters."""

from __future__ import annotations

import base64
import shutil
import subprocess
import threading
import time
import uuid

import pytest
from aiokafka import AIOKafkaProducer

from schemas.codec import encode
from schemas.topics import FEEDBACK, GENERATIONS
from services.sink.settings import SinkSettings
from services.sink.worker import Sink
from tests.factories import feedback, generation


def _drain(sink: Sink, client, want: dict[str, int], timeout_s: float = 60.0) -> dict[str, int]:
    """Run sink batches until every table in `want` holds that many distinct rows."""
    deadline = time.monotonic() + timeout_s
    counts: dict[str, int] = {}
    while time.monotonic() < deadline:
        sink.run_once()
        counts = {t: int(client.command(f"SELECT count() FROM {t} FINAL")) for t in want}
        if counts == want:
            return counts
    return counts


def _sink(bootstrap: str, prefix: str, client) -> Sink:
    settings = SinkSettings(
        topic_prefix=prefix, sink_group_id=f"sink-{uuid.uuid4().hex[:8]}", sink_batch_max_wait_s=0.3
    )
    return Sink(settings, bootstrap, client)


async def test_aiokafka_and_kcat_events_land_in_clickhouse(kafka_bootstrap, topic_prefix, clickhouse) -> None:
    gen = generation("gen-a")
    fb = feedback("gen-a", kind="rating", value=4.0)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(GENERATIONS.full_name(topic_prefix), encode(gen), key=b"gen-a")
        await producer.send_and_wait(FEEDBACK.full_name(topic_prefix), encode(fb), key=b"gen-a")
    finally:
        await producer.stop()

    kcat = shutil.which("kcat")
    assert kcat, "kcat is required (Debian package kcat; the README's test command installs it)"
    kcat_fb = feedback("gen-a", kind="accept", value=None)
    subprocess.run(
        [kcat, "-P", "-b", kafka_bootstrap, "-t", FEEDBACK.full_name(topic_prefix), "-K", "|"],
        input=b"gen-a|" + encode(kcat_fb) + b"\n",
        check=True,
        timeout=30,
    )

    sink = _sink(kafka_bootstrap, topic_prefix, clickhouse)
    try:
        counts = _drain(sink, clickhouse, {"generations": 1, "feedback": 2})
    finally:
        sink.close()
    assert counts == {"generations": 1, "feedback": 2}
    rows = clickhouse.query("SELECT kind, value FROM feedback FINAL ORDER BY kind").result_rows
    assert rows == [("accept", None), ("rating", 4.0)]
    row = clickhouse.query("SELECT completion_tokens, completion_logprob_sum FROM generations").result_rows
    assert row == [(2, -1.75)]


def test_invalid_event_goes_to_dead_letters_with_reason_and_bytes(kafka_bootstrap, topic_prefix, clickhouse) -> None:
    bad = b'{"generation_id": "gen-b", "kind": "rating", "value": 9, "user_id": "u"}'
    garbage = b"\xff\x00 not json"
    subprocess.run(
        ["kcat", "-P", "-b", kafka_bootstrap, "-t", FEEDBACK.full_name(topic_prefix), "-K", "|"],
        input=b"gen-b|" + bad + b"\ngen-c|" + garbage + b"\n",
        check=True,
        timeout=30,
    )
    sink = _sink(kafka_bootstrap, topic_prefix, clickhouse)
    try:
        _drain(sink, clickhouse, {"dead_letters": 2, "feedback": 0})
        # Redelivery of the same bad messages (a new group reads them again) adds nothing.
        again = _sink(kafka_bootstrap, topic_prefix, clickhouse)
        try:
            counts = _drain(again, clickhouse, {"dead_letters": 2, "feedback": 0}, timeout_s=10)
        finally:
            again.close()
    finally:
        sink.close()
    assert counts == {"dead_letters": 2, "feedback": 0}
    rows = clickhouse.query(
        "SELECT error_field, reason, original_b64, key_b64, rejected_by FROM dead_letters FINAL"
    ).result_rows
    rows.sort(key=lambda r: base64.b64decode(r[3]))  # gen-b, then gen-c
    assert rows[0][0] == "value" and "between 1 and 5" in rows[0][1]
    assert base64.b64decode(rows[0][2]) == bad and base64.b64decode(rows[0][3]) == b"gen-b"
    assert rows[1][0] is None and "invalid JSON" in rows[1][1]
    assert base64.b64decode(rows[1][2]) == garbage
    assert {r[4] for r in rows} == {"sink"}


class _FlakyClient:
    """A ClickHouse client whose first `failures` inserts raise, as a server outage would."""

    def __init__(self, client, failures: int) -> None:
        self.client = client
        self.failures = failures

    def raw_insert(self, *args, **kwargs):
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("ClickHouse unavailable")
        return self.client.raw_insert(*args, **kwargs)


def test_sink_retries_a_failed_insert_and_commits_only_after_it(kafka_bootstrap, topic_prefix, clickhouse) -> None:
    subprocess.run(
        ["kcat", "-P", "-b", kafka_bootstrap, "-t", FEEDBACK.full_name(topic_prefix), "-K", "|"],
        input=b"g|" + encode(feedback("g", kind="copy", value=None)) + b"\n",
        check=True,
        timeout=30,
    )
    flaky = _FlakyClient(clickhouse, failures=3)
    settings = SinkSettings(
        topic_prefix=topic_prefix,
        sink_group_id=f"sink-{uuid.uuid4().hex[:8]}",
        sink_batch_max_wait_s=0.3,
        sink_retry_initial_s=0.05,
    )
    sink = Sink(settings, kafka_bootstrap, flaky)
    try:
        deadline = time.monotonic() + 60
        while sink.stats.messages == 0 and time.monotonic() < deadline:
            sink.run_once()
    finally:
        sink.close()
    assert sink.stats.insert_failures == 3
    assert int(clickhouse.command("SELECT count() FROM feedback FINAL")) == 1


def test_sink_stopped_during_outage_commits_nothing(kafka_bootstrap, topic_prefix, clickhouse) -> None:
    subprocess.run(
        ["kcat", "-P", "-b", kafka_bootstrap, "-t", FEEDBACK.full_name(topic_prefix), "-K", "|"],
        input=b"g|" + encode(feedback("g", kind="copy", value=None)) + b"\n",
        check=True,
        timeout=30,
    )
    group = f"sink-{uuid.uuid4().hex[:8]}"
    settings = SinkSettings(
        topic_prefix=topic_prefix, sink_group_id=group, sink_batch_max_wait_s=0.3, sink_retry_initial_s=0.05
    )
    stop = threading.Event()
    down = Sink(settings, kafka_bootstrap, _FlakyClient(clickhouse, failures=10**9))
    deadline = time.monotonic() + 30
    while down.stats.insert_failures == 0 and time.monotonic() < deadline:
        threading.Timer(0.5, stop.set).start()
        down.run_once(stop)
    down.close()
    assert down.stats.insert_failures > 0 and down.stats.messages == 0
    # Same group, ClickHouse back: the uncommitted message is delivered again, not lost.
    up = Sink(settings, kafka_bootstrap, clickhouse)
    try:
        counts = _drain(up, clickhouse, {"feedback": 1})
    finally:
        up.close()
    assert counts == {"feedback": 1}


@pytest.mark.parametrize(
    "table", ["generations", "feedback", "samples", "model_updates", "replica_status", "dead_letters", "rollouts"]
)
def test_migrations_created_every_table(clickhouse, table: str) -> None:
    assert int(clickhouse.command(f"EXISTS TABLE {table}")) == 1
