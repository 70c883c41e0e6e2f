"""Integration tests: real `rlfeed streams` worker processes on the real broker.

Each scenario counts samples exactly after dropping duplicate sample ids. Workers are
subprocesses (`python -m streams.worker`), so a kill -9 is a real one.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.codec import encode
from schemas.events import FeedbackEvent, GenerationEvent, now_ms
from schemas.topics import DLQ, FEEDBACK, GENERATIONS, JOIN_PARTITIONS, SAMPLES
from services.kafka.producers import producer_config
from services.kafka.topics import ensure_topics
from streams.changelog import changelog_topic, read_partitions, restore
from streams.join import JoinConfig

pytestmark = pytest.mark.timeout(120)

WAIT_S = 45.0


class Worker:
    """One worker subprocess with its log file."""

    def __init__(self, bootstrap: str, prefix: str, group: str, log_path: Path, **env: str) -> None:
        self.log_path = log_path
        full_env = {
            **os.environ,
            "RLFEED_KAFKA_URL": f"kafka://{bootstrap}",
            "RLFEED_TOPIC_PREFIX": prefix,
            "RLFEED_GROUP_ID": group,
            "RLFEED_STREAMS_WEB_ENABLED": "false",
            "RLFEED_LOG_LEVEL": "info",
            "RLFEED_SESSION_TIMEOUT_S": "6",
            "RLFEED_MAX_POLL_INTERVAL_S": "10",
            **env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.worker"],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=open(log_path, "wb"),  # noqa: SIM115 - owned by the subprocess
        )

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_path.read_bytes().splitlines():
            if line.startswith(b"{"):
                try:
                    out.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    continue
        return out

    def events(self, name: str) -> list[dict]:
        return [r for r in self.logs() if r.get("event") == name]

    def wait_log(self, name: str, pred: Callable[[dict], bool] = lambda r: True, timeout_s: float = WAIT_S) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            hits = [r for r in self.events(name) if pred(r)]
            if hits:
                return hits[-1]
            assert self.proc.poll() is None, f"worker exited: {self.log_path.read_text()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"no {name} log within {timeout_s} s: {self.log_path.read_text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Reader:
    """Reads every partition of some topics from the start, accumulating messages."""

    def __init__(self, bootstrap: str, topics: dict[str, int]) -> None:
        self.consumer = Consumer(
            {"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
        )
        self.consumer.assign([TopicPartition(t, p, 0) for t, n in topics.items() for p in range(n)])
        self.messages: dict[str, list] = {t: [] for t in topics}

    def poll(self) -> None:
        for m in self.consumer.consume(10_000, 0.2):
            if m.error() is None:
                self.messages[m.topic()].append(m)

    def wait(self, pred: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "") -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.poll()
            if pred():
                return
        raise AssertionError(f"timed out waiting for {what}")

    def close(self) -> None:
        self.consumer.close()


def produce(bootstrap: str, prefix: str, events: list, raw: list[tuple[str, bytes, bytes]] = ()) -> None:
    producer = Producer({**producer_config(bootstrap), "linger.ms": 5})
    for e in events:
        topic = GENERATIONS if isinstance(e, GenerationEvent) else FEEDBACK
        producer.produce(topic.full_name(prefix), encode(e), e.generation_id.encode())
        producer.poll(0)
    for topic_name, key, value in raw:
        producer.produce(f"{prefix}{topic_name}", value, key)
    assert producer.flush(30) == 0


def gen(gid: str, t: int | None = None) -> GenerationEvent:
    return GenerationEvent(
        event_id=f"e-{gid}",
        event_time_ms=t or now_ms(),
        generation_id=gid,
        model="m",
        policy_version=1,
        prompt="p",
        completion="a b c d",
        prompt_token_ids=[1, 2, 3],
        completion_token_ids=[4, 5],
        completion_logprobs=[-0.5, -1.5],
        user_id=f"u{hash(gid) % 50}",
    )


def fb(eid: str, gid: str, kind: str, t: int | None = None, **kw) -> FeedbackEvent:
    return FeedbackEvent(event_id=eid, event_time_ms=t or now_ms(), generation_id=gid, kind=kind, user_id="u", **kw)


def samples_by_gen(reader: Reader, prefix: str) -> dict[str, dict[str, dict]]:
    """generation_id -> {sample id -> sample}, duplicates (same id) collapsed."""
    out: dict[str, dict[str, dict]] = {}
    for m in reader.messages[SAMPLES.full_name(prefix)]:
        s = orjson.loads(m.value())
        out.setdefault(s["generation_id"], {})[s["event_id"]] = s
    return out


def distinct_samples(reader: Reader, prefix: str) -> int:
    return len({orjson.loads(m.value())["event_id"] for m in reader.messages[SAMPLES.full_name(prefix)]})


def reader_for(bootstrap: str, prefix: str) -> Reader:
    return Reader(bootstrap, {SAMPLES.full_name(prefix): JOIN_PARTITIONS, DLQ.full_name(prefix): 1})


def changelog_state(bootstrap: str, prefix: str) -> dict:
    records = read_partitions(bootstrap, changelog_topic(prefix), list(range(JOIN_PARTITIONS)), 30.0)
    cfg = JoinConfig()
    pending, settled = {}, {}
    for p, recs in records.items():
        st = restore(p, recs, cfg, now_ms())
        pending.update(st.pending)
        settled.update(st.settled)
    return {"pending": pending, "settled": settled}


# --- one worker, many scenarios ---

SCENARIO_ENV = {
    "RLFEED_SETTLE_WINDOW_S": "1.5",
    "RLFEED_GENERATION_TTL_S": "2",
    "RLFEED_ORPHAN_FEEDBACK_TTL_S": "2",
    "RLFEED_CORRECTION_WINDOW_S": "300",
    "RLFEED_TICK_INTERVAL_S": "0.2",
}


@pytest.fixture(scope="module")
def scenario(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Worker, Reader]]:
    prefix = f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(kafka_bootstrap, prefix)
    worker = Worker(
        kafka_bootstrap, prefix, f"g-{uuid.uuid4().hex[:8]}", tmp_path_factory.mktemp("w") / "w.log", **SCENARIO_ENV
    )
    worker.wait_log("streams.assigned", lambda r: len(r["partitions"]) == JOIN_PARTITIONS)
    reader = reader_for(kafka_bootstrap, prefix)
    yield prefix, worker, reader
    reader.close()
    worker.stop()


def test_out_of_order_feedback_first(kafka_bootstrap: str, scenario) -> None:
    prefix, _, reader = scenario
    gids = [f"ooo-{i}" for i in range(20)]
    produce(kafka_bootstrap, prefix, [fb(f"ooo-a-{g}", g, "accept") for g in gids])
    time.sleep(0.5)
    produce(kafka_bootstrap, prefix, [gen(g) for g in gids])
    reader.wait(lambda: all(g in samples_by_gen(reader, prefix) for g in gids), what="out-of-order samples")
    got = samples_by_gen(reader, prefix)
    for g in gids:
        (s,) = got[g].values()
        assert s["settle_reason"] == "terminal" and s["reward"] == 0.75 and s["feedback_event_ids"] == [f"ooo-a-{g}"]


def test_duplicates_give_one_sample(kafka_bootstrap: str, scenario) -> None:
    prefix, _, reader = scenario
    gids = [f"dup-{i}" for i in range(20)]
    events = [gen(g) for g in gids] + [fb(f"dup-t-{g}", g, "thumb", value=1) for g in gids]
    produce(kafka_bootstrap, prefix, events + events)  # every event twice
    produce(kafka_bootstrap, prefix, [fb(f"dup-a-{g}", g, "accept") for g in gids] * 2)
    reader.wait(lambda: all(g in samples_by_gen(reader, prefix) for g in gids), what="duplicate samples")
    time.sleep(1.0)
    reader.poll()
    got = samples_by_gen(reader, prefix)
    for g in gids:
        (s,) = got[g].values()
        assert sorted(s["feedback_event_ids"]) == [f"dup-a-{g}", f"dup-t-{g}"]
        assert s["reward_components"] == {"thumb": 1.0, "accept": 0.75}


def test_late_feedback_corrects_and_window_settles(kafka_bootstrap: str, scenario) -> None:
    prefix, _, reader = scenario
    gids = [f"late-{i}" for i in range(10)]
    produce(kafka_bootstrap, prefix, [gen(g) for g in gids] + [fb(f"late-t-{g}", g, "thumb", value=-1) for g in gids])
    # no terminal signal: the 1.5 s settle window (moved by the wall-clock tick) settles them
    reader.wait(lambda: all(g in samples_by_gen(reader, prefix) for g in gids), what="window samples")
    first = {g: next(iter(samples_by_gen(reader, prefix)[g].values())) for g in gids}
    assert {s["settle_reason"] for s in first.values()} == {"window"}
    produce(kafka_bootstrap, prefix, [fb(f"late-c-{g}", g, "copy") for g in gids])
    reader.wait(lambda: all(len(samples_by_gen(reader, prefix)[g]) == 2 for g in gids), what="corrections")
    for g in gids:
        corr = [s for s in samples_by_gen(reader, prefix)[g].values() if s["settle_reason"] == "correction"]
        (c,) = corr
        assert c["corrects_event_id"] == first[g]["event_id"]
        assert c["reward_components"] == {"thumb": -1.0, "copy": 0.5} and c["reward"] == -0.5


def test_never_feedback_and_never_generation(kafka_bootstrap: str, scenario) -> None:
    prefix, _, reader = scenario
    lonely = [f"never-g-{i}" for i in range(10)]
    orphans = [f"never-f-{i}" for i in range(10)]
    produce(kafka_bootstrap, prefix, [gen(g) for g in lonely] + [fb(f"o-{g}", g, "thumb", value=1) for g in orphans])

    def orphan_letters() -> set[str]:
        keys = set()
        for m in reader.messages[DLQ.full_name(prefix)]:
            d = orjson.loads(m.value())
            if "orphan feedback" in d["reason"]:
                keys.add(FeedbackEvent.model_validate_json(base64.b64decode(d["original_b64"])).generation_id)
        return keys

    reader.wait(lambda: orphan_letters() >= set(orphans), what="orphan dead letters")
    # the lonely generations expired (dropped, no implicit reward set): no sample, kept for late feedback
    state = changelog_state(kafka_bootstrap, prefix)
    for g in lonely:
        e = state["settled"][g]
        assert e.sample_id is None and e.fbs == []
    assert not set(orphans) & (set(state["pending"]) | set(state["settled"]))
    assert not set(lonely) & set(samples_by_gen(reader, prefix))
    # late feedback reopens a dropped generation
    produce(kafka_bootstrap, prefix, [fb(f"re-{lonely[0]}", lonely[0], "reject")])
    reader.wait(lambda: lonely[0] in samples_by_gen(reader, prefix), what="reopened sample")
    (s,) = samples_by_gen(reader, prefix)[lonely[0]].values()
    assert s["settle_reason"] == "terminal" and s["reward"] == -0.25


def test_malformed_input_goes_to_dlq_and_worker_survives(kafka_bootstrap: str, scenario) -> None:
    prefix, worker, reader = scenario
    good = gen("mal-ok")
    bad = [
        ("generations.v1", b"mal-1", b"{not json"),
        ("feedback.v1", b"mal-2", b'{"kind": "smile"}'),
        ("feedback.v1", b"mal-3", encode(fb("mal-3f", "mal-3", "rating", value=3)).replace(b"3.0", b"1e9")),
        ("generations.v1", b"mal-4", b"[" * 900_000),  # its dead letter must be cut to fit the broker
        ("generations.v1", b"mal-5", encode(gen("other-key"))),
    ]
    produce(kafka_bootstrap, prefix, [], raw=bad)
    produce(kafka_bootstrap, prefix, [good, fb("mal-ok-a", "mal-ok", "accept")])

    def letters() -> dict[bytes, dict]:
        return {m.key(): orjson.loads(m.value()) for m in reader.messages[DLQ.full_name(prefix)]}

    reader.wait(lambda: {k for _, k, _ in bad} <= set(letters()), what="dead letters")
    reader.wait(lambda: "mal-ok" in samples_by_gen(reader, prefix), what="sample after bad input")
    got = letters()
    for topic, key, value in bad:
        d = got[key]
        assert value.startswith(base64.b64decode(d["original_b64"]))
        assert base64.b64decode(d["original_b64"]) == value or key == b"mal-4"
        assert d["source_topic"] == f"{prefix}{topic}" and d["rejected_by"] == "streams" and d["reason"]
    assert "truncated" in got[b"mal-4"]["reason"] and "not the generation_id" in got[b"mal-5"]["reason"]
    assert worker.proc.poll() is None


# --- rebalance and crash ---

BIG_ENV = {"RLFEED_SETTLE_WINDOW_S": "600", "RLFEED_GENERATION_TTL_S": "600", "RLFEED_BATCH_MAX_MESSAGES": "500"}


def stream(n: int, tag: str) -> tuple[list[str], list, list]:
    """n generations with a thumb each (part 1), and an accept each (part 2)."""
    gids = [f"{tag}-{i}" for i in range(n)]
    part1 = [e for g in gids for e in (gen(g), fb(f"{g}-t", g, "thumb", value=1))]
    part2 = [fb(f"{g}-a", g, "accept") for g in gids]
    return gids, part1, part2


def assert_exactly_one_sample_each(reader: Reader, prefix: str, gids: list[str]) -> None:
    got = samples_by_gen(reader, prefix)
    assert set(got) == set(gids)
    for g in gids:
        (s,) = got[g].values()  # duplicates (same id) collapsed; one distinct sample each
        assert sorted(s["feedback_event_ids"]) == [f"{g}-a", f"{g}-t"] and s["settle_reason"] == "terminal"


def test_two_worker_rebalance_mid_stream(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    prefix, group = topic_prefix, f"g-{uuid.uuid4().hex[:8]}"
    gids, part1, part2 = stream(1500, "rb")
    reader = reader_for(kafka_bootstrap, prefix)
    a = Worker(kafka_bootstrap, prefix, group, tmp_path / "a.log", **BIG_ENV)
    b = None
    try:
        a.wait_log("streams.assigned", lambda r: len(r["partitions"]) == JOIN_PARTITIONS)
        produce(kafka_bootstrap, prefix, part1 + part2[: len(gids) // 2])
        reader.wait(lambda: distinct_samples(reader, prefix) >= 100, what="first samples")
        b = Worker(kafka_bootstrap, prefix, group, tmp_path / "b.log", **BIG_ENV)
        assigned = b.wait_log("streams.assigned", lambda r: len(r["partitions"]) > 0)
        produce(kafka_bootstrap, prefix, part2[len(gids) // 2 :])
        reader.wait(lambda: distinct_samples(reader, prefix) >= len(gids), what="all samples")
        time.sleep(1.0)
        reader.poll()
        assert_exactly_one_sample_each(reader, prefix, gids)
        # b rebuilt its partitions' state from the changelog
        assert sum(assigned["restored"].values()) > 0
        state = changelog_state(kafka_bootstrap, prefix)
        assert not state["pending"] and set(state["settled"]) == set(gids)
        got = samples_by_gen(reader, prefix)
        assert all(state["settled"][g].sample_id in got[g] for g in gids)
    finally:
        for w in (a, b):
            if w is not None:
                w.stop()
        reader.close()
    b_samples = b.wait_log("streams.join_stopped", timeout_s=5).get("samples", 0)
    assert b_samples > 0, "the second worker settled nothing"


def test_kill_9_and_restart(kafka_bootstrap: str, topic_prefix: str, tmp_path: Path) -> None:
    """The batch ordering (state, produce, flush, commit) under a kill -9 mid-stream."""
    prefix, group = topic_prefix, f"g-{uuid.uuid4().hex[:8]}"
    gids, part1, part2 = stream(3000, "k9")
    reader = reader_for(kafka_bootstrap, prefix)
    produce(kafka_bootstrap, prefix, part1 + part2[: len(gids) // 2])
    # static membership: the restarted worker takes over the dead one's partitions at once
    static = {**BIG_ENV, "RLFEED_GROUP_INSTANCE_ID": "worker-1"}
    first = Worker(kafka_bootstrap, prefix, group, tmp_path / "first.log", **static)
    second = None
    try:
        reader.wait(lambda: distinct_samples(reader, prefix) >= 50, what="first samples")
        first.proc.send_signal(signal.SIGKILL)  # mid-stream: batches of 500 still flowing
        first.proc.wait(10)
        killed_at = distinct_samples(reader, prefix)
        assert killed_at < len(gids) // 2, "the kill came too late to land mid-stream"
        produce(kafka_bootstrap, prefix, part2[len(gids) // 2 :])
        second = Worker(kafka_bootstrap, prefix, group, tmp_path / "second.log", **static)
        assigned = second.wait_log("streams.assigned", lambda r: len(r["partitions"]) == JOIN_PARTITIONS)
        assert sum(assigned["restored"].values()) > 0 and assigned["changelog_records"] > 0
        reader.wait(lambda: distinct_samples(reader, prefix) >= len(gids), what="all samples")
        time.sleep(1.0)
        reader.poll()
        assert_exactly_one_sample_each(reader, prefix, gids)
        state = changelog_state(kafka_bootstrap, prefix)
        assert not state["pending"] and set(state["settled"]) == set(gids)
    finally:
        for w in (first, second):
            if w is not None:
                w.stop()
        reader.close()


def test_a_fenced_worker_replaces_its_consumer_and_keeps_joining(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    """A second member with the worker's static id fences it (as after a broker restart):
    `consume()` gets a `_FATAL` error without the fatal flag; the worker must replace its
    consumer (state restored from the changelog) and join what comes after, not poll a dead
    consumer forever."""
    prefix, group = topic_prefix, f"g-{uuid.uuid4().hex[:8]}"
    static = {**SCENARIO_ENV, "RLFEED_GROUP_INSTANCE_ID": f"static-{uuid.uuid4().hex[:6]}"}
    reader = reader_for(kafka_bootstrap, prefix)
    worker = Worker(kafka_bootstrap, prefix, group, tmp_path / "w.log", **static)
    try:
        worker.wait_log("streams.assigned", lambda r: len(r["partitions"]) == JOIN_PARTITIONS)
        produce(kafka_bootstrap, prefix, [gen("fence-0"), fb("fa-0", "fence-0", "accept")])
        reader.wait(lambda: "fence-0" in samples_by_gen(reader, prefix), what="the first sample")
        intruder = Consumer(
            {
                "bootstrap.servers": kafka_bootstrap,
                "group.id": group,
                "group.instance.id": static["RLFEED_GROUP_INSTANCE_ID"],
                "partition.assignment.strategy": "range",
                "session.timeout.ms": 6000,
            }
        )
        intruder.subscribe([GENERATIONS.full_name(prefix), FEEDBACK.full_name(prefix)])
        intruder.consume(10, 3.0)
        intruder.close()
        worker.wait_log("streams.consumer_renewed")
        produce(kafka_bootstrap, prefix, [gen("fence-1"), fb("fa-1", "fence-1", "accept")])
        reader.wait(lambda: "fence-1" in samples_by_gen(reader, prefix), what="a sample after the fence")
        assert worker.proc.poll() is None
    finally:
        worker.stop()
        reader.close()


def test_prefetch_config_bounds_librdkafkas_queue_by_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    from streams.hot_path import prefetch_config
    from streams.settings import StreamsSettings

    monkeypatch.setenv("RLFEED_PREFETCH_BATCHES", "3")
    monkeypatch.setenv("RLFEED_FETCH_QUEUE_BACKOFF_MS", "7")
    cfg = prefetch_config(StreamsSettings(batch_max_messages=250))
    assert cfg == {"queued.min.messages": 750, "fetch.queue.backoff.ms": 7}
    with pytest.raises(ValueError, match="prefetch_batches"):
        StreamsSettings(prefetch_batches=0)
