"""Exactly once into ClickHouse across a kill -9 of the sink.

Events of every public topic are produced, a `rlfeed sink` subprocess is killed with
SIGKILL after it has committed some batches but not all (seen through the consumer
group's committed offsets), a second one finishes the work, and every table then holds
exactly the produced event ids (read with FINAL): nothing lost, nothing doubled.

The chdb data directory is owned by one process at a time, so this test process never
opens it: a fresh `python -c` reads the tables after the last sink has exited.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.codec import encode, key_of
from schemas.events import (
    DeadLetterEvent,
    Event,
    ModelUpdateEvent,
    ReplicaStatusEvent,
    RolloutEvent,
    SampleEvent,
)
from schemas.topics import FEEDBACK, PUBLIC_TOPICS, Topic
from services.kafka.producers import producer_config
from services.kafka.url import kafka_url
from services.sink.rows import SPECS
from tests.factories import feedback, generation

REPO = Path(__file__).resolve().parents[1]
BATCH = 40
"""Small sink batches, so the stream spans many commits and the kill lands mid-stream."""
PER_TOPIC = {
    "generations.v1": 300,
    "feedback.v1": 300,
    "samples.v1": 200,
    "model-updates.v1": 40,
    "replica-status.v1": 40,
    "dlq.v1": 40,
    "rollouts.v1": 40,
}
READ_TABLES = """
import json, sys
from services.clickhouse.client import connect
client = connect(sys.argv[1])
out = {}
for table in sys.argv[2:]:
    final = client.query(f"SELECT event_id FROM {table} FINAL").result_rows
    raw = int(client.command(f"SELECT count() FROM {table}"))
    out[table] = {"ids": [r[0] for r in final], "raw": raw}
print(json.dumps(out))
"""


def _event(topic: str, i: int) -> Event:
    """A valid event of `topic`, distinct for each i."""
    gid = f"gen-{i}"
    if topic == "generations.v1":
        return generation(gid, policy_version=i % 5, session_id=f"s{i % 7}", latency_ms=float(i))
    if topic == "feedback.v1":
        return feedback(gid, kind=("thumb", "rating", "accept")[i % 3], value=(1.0, 3.0, None)[i % 3])
    if topic == "samples.v1":
        return SampleEvent(
            generation_id=gid,
            model="m",
            policy_version=1,
            prompt="p",
            completion="c" * (i % 9),
            prompt_token_ids=[1, 2],
            completion_token_ids=[3],
            completion_logprobs=[-0.1],
            reward=0.5,
            reward_components={"thumb": 1.0},
            feedback_event_ids=[f"fb-{i}"],
            settle_reason="terminal",
            user_id="u",
            generated_at_ms=1_700_000_000_000 + i,
        )
    if topic == "model-updates.v1":
        return ModelUpdateEvent(
            model=f"m{i % 3}",
            version=i + 1,
            artifact_kind="full",
            artifact_url=f"m/v{i + 1}",
            sha256="0" * 64,
            size_bytes=i,
            eval_metrics={"reward": 0.1},
        )
    if topic == "replica-status.v1":
        return ReplicaStatusEvent(replica_id=f"r{i % 4}", model="m", version=i, state="serving", engine="vllm")
    if topic == "dlq.v1":
        return DeadLetterEvent(
            source_topic="feedback.v1",
            source_offset=i,
            key_b64="Zw==",
            original_b64="e30=",
            reason="bad",
            rejected_by="t",
        )
    return RolloutEvent(model=f"m{i % 3}", stable_version=i, decision="collect", arms={"a": float(i)})


def _produce(bootstrap: str, prefix: str) -> tuple[dict[str, set[str]], str]:
    """Produce every topic's events (interleaved) and one invalid feedback message.

    Returns the expected event ids per table, and the id of the dead letter the sink
    makes for the invalid message (deterministic: sink|topic|partition|offset).
    """
    expected: dict[str, set[str]] = {SPECS[name].table: set() for name in PER_TOPIC}
    producer = Producer({**producer_config(bootstrap), "acks": "all", "linger.ms": 5})
    topics: dict[str, Topic] = {t.name: t for t in PUBLIC_TOPICS}
    for i in range(max(PER_TOPIC.values())):
        for name, n in PER_TOPIC.items():
            if i < n:
                e = _event(name, i)
                producer.produce(topics[name].full_name(prefix), encode(e), key_of(e, topics[name].key))
                expected[SPECS[name].table].add(e.event_id)
        producer.poll(0)
    delivered: list[tuple[int, int]] = []

    def on_delivery(err: object, msg: object) -> None:
        assert err is None, err
        delivered.append((msg.partition(), msg.offset()))  # type: ignore[attr-defined]

    bad_topic = FEEDBACK.full_name(prefix)
    producer.produce(bad_topic, b'{"generation_id": "gen-x", "kind": "rating"}', b"gen-x", on_delivery=on_delivery)
    assert producer.flush(30) == 0
    partition, offset = delivered[0]
    letter_id = hashlib.sha256(f"sink|{bad_topic}|{partition}|{offset}".encode()).hexdigest()[:32]
    expected["dead_letters"].add(letter_id)
    return expected, letter_id


class _Offsets:
    """The sink group's committed offsets against the topics' end offsets."""

    def __init__(self, bootstrap: str, prefix: str, group: str) -> None:
        self.consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
        meta = self.consumer.list_topics(timeout=10).topics
        self.partitions = [
            TopicPartition(t.full_name(prefix), p) for t in PUBLIC_TOPICS for p in meta[t.full_name(prefix)].partitions
        ]

    def committed(self) -> int:
        """Messages committed by the group, over every partition."""
        return sum(max(tp.offset, 0) for tp in self.consumer.committed(self.partitions, timeout=10))

    def end(self) -> int:
        """Messages on the topics right now (high watermarks)."""
        return sum(self.consumer.get_watermark_offsets(tp, timeout=10)[1] for tp in self.partitions)

    def describe(self) -> str:
        """Committed and end offsets, for failure messages."""
        return f"committed {self.committed()} of {self.end()}"

    def close(self) -> None:
        self.consumer.close()


def _start_sink(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.cli", "sink"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _wait_for(
    cond: Callable[[], bool],
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    what: str,
    log: Path,
    describe: Callable[[], str],
) -> None:
    """Poll `cond` until it is true; fail if the sink exits or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"sink exited ({proc.returncode}) before {what}: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {describe()}; {log.read_text()[-3000:]}")


def test_every_topic_lands_exactly_once_across_kill_9(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    expected, letter_id = _produce(kafka_bootstrap, topic_prefix)
    produced = sum(PER_TOPIC.values()) + 1
    group = f"sink-{uuid.uuid4().hex[:8]}"
    url = f"chdb://{tmp_path / 'chdb'}?database=sink_eo"
    log = tmp_path / "sink.log"
    env = {
        **os.environ,
        "RLFEED_KAFKA_URL": kafka_url(kafka_bootstrap),
        "RLFEED_CLICKHOUSE_URL": url,
        "RLFEED_TOPIC_PREFIX": topic_prefix,
        "RLFEED_HOME_DIR": str(tmp_path / "home"),
        "RLFEED_SINK_GROUP_ID": group,
        "RLFEED_SINK_GROUP_INSTANCE_ID": f"{group}-0",
        "RLFEED_SINK_BATCH_MAX_EVENTS": str(BATCH),
        "RLFEED_SINK_BATCH_MAX_WAIT_S": "0.2",
        "RLFEED_SINK_SESSION_TIMEOUT_S": "6",
        "RLFEED_SINK_MAX_POLL_INTERVAL_S": "8",
        "RLFEED_LOG_LEVEL": "warning",
    }
    offsets = _Offsets(kafka_bootstrap, topic_prefix, f"{topic_prefix}{group}")
    first = second = None
    try:
        first = _start_sink(env, log)
        _wait_for(lambda: offsets.committed() > 0, first, 45, "the first commit", log, offsets.describe)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        at_kill = offsets.committed()
        assert 0 < at_kill < produced, f"the kill was not mid-stream: {at_kill} of {produced} committed"

        second = _start_sink(env, log)
        # Done: everything on the topics (the sink's own dead letter included) committed.
        # The letter may be on dlq.v1 twice: when the first sink produced it for a batch
        # it was killed before committing, the second redoes that batch (the same
        # deterministic event id: one row after FINAL, checked below).
        _wait_for(
            lambda: offsets.committed() == offsets.end() in (produced + 1, produced + 2),
            second,
            60,
            "the last commit",
            log,
            offsets.describe,
        )
        second.send_signal(signal.SIGTERM)
        second.wait(20)
    finally:
        offsets.close()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)

    tables = sorted(expected)
    read = subprocess.run(
        [sys.executable, "-c", READ_TABLES, url, *tables], cwd=REPO, capture_output=True, timeout=60, check=True
    )
    got = json.loads(read.stdout)
    for table in tables:
        ids = got[table]["ids"]
        assert len(ids) == len(set(ids)), f"{table}: duplicate event ids after FINAL"
        assert set(ids) == expected[table], (
            f"{table}: missing {len(expected[table] - set(ids))}, unexpected {len(set(ids) - expected[table])}"
        )
        assert got[table]["raw"] >= len(ids)
    assert letter_id in got["dead_letters"]["ids"]
