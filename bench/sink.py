"""Benchmark of the ClickHouse sink: prints one JSON object.

N events of a realistic mix (mostly generations, feedback and samples; a few model
updates, replica statuses, rollouts and dead letters) are produced to the broker first.
Then, in one run:

- `rows_per_s`: the sink (`services.sink.worker.Sink`, one consumer, chdb in this
  process) from its construction (group join included) until every event is inserted
  and its offsets are committed.
- `raw_insert_rows_per_s`: clickhouse-connect inserting the same rows (row lists, one
  `client.insert` per table and `--batch` rows, as the sink batches) into a fresh
  database with the same tables: no Kafka, no decoding, no validation.
- `raw_columnar_rows_per_s`: the same with column-oriented data (what the sink sends).
- `ratio`: rows_per_s / raw_insert_rows_per_s.

Usage: `python bench/sink.py [--events 1000000] [--batch 20000] [--profile out.prof]`
(`RLFEED_KAFKA_URL` picks a running broker; otherwise an embedded noida-db is started in
a temporary directory, stopped by pid and deleted afterwards).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Producer

from schemas.codec import encode, key_of
from schemas.events import (
    DeadLetterEvent,
    Event,
    FeedbackEvent,
    GenerationEvent,
    ModelUpdateEvent,
    ReplicaStatusEvent,
    RolloutEvent,
    SampleEvent,
)
from schemas.topics import BY_NAME
from services.kafka.producers import producer_config
from services.kafka.topics import ensure_topics
from services.kafka.url import bootstrap_servers
from services.sink.rows import SPECS

WORDS = [
    "the",
    "a",
    "policy",
    "reward",
    "user",
    "model",
    "token",
    "answer",
    "code",
    "edit",
    "good",
    "bad",
    "fast",
    "slow",
    "data",
    "stream",
    "join",
]
MIX = (
    ("generations.v1", 0.30),
    ("feedback.v1", 0.40),
    ("samples.v1", 0.27),
    ("model-updates.v1", 0.0075),
    ("replica-status.v1", 0.0075),
    ("rollouts.v1", 0.0075),
    ("dlq.v1", 0.0075),
)
PLACEHOLDER = "E" * 32
TEMPLATES_PER_TOPIC = 200


def _template(topic: str, rng: random.Random, i: int) -> Event:
    """One valid event of `topic` with the placeholder event id."""
    t = int(time.time() * 1000) - rng.randrange(3_600_000)
    gid = f"g{i:06d}"
    n_prompt, n_completion = rng.randint(24, 72), rng.randint(24, 72)
    text = " ".join(rng.choices(WORDS, k=n_completion // 2))
    common = {"event_id": PLACEHOLDER, "event_time_ms": t}
    if topic == "generations.v1":
        return GenerationEvent(
            **common,
            generation_id=gid,
            model="bench",
            policy_version=3,
            prompt=" ".join(rng.choices(WORDS, k=n_prompt // 2)),
            completion=text,
            prompt_token_ids=[rng.randrange(50_000) for _ in range(n_prompt)],
            completion_token_ids=[rng.randrange(50_000) for _ in range(n_completion)],
            completion_logprobs=[round(-rng.random() * 3, 4) for _ in range(n_completion)],
            user_id=f"u{rng.randrange(5000)}",
            session_id=f"s{rng.randrange(9000)}",
            replica_id="replica-0",
            latency_ms=round(rng.random() * 900, 2),
        )
    if topic == "feedback.v1":
        kind = rng.choice(["thumb", "rating", "accept", "reject", "copy", "regenerate", "dwell", "edit"])
        kw: dict = {}
        if kind == "thumb":
            kw["value"] = rng.choice([1, -1])
        elif kind == "rating":
            kw["value"] = rng.randint(1, 5)
        elif kind == "dwell":
            kw["value"] = round(rng.random() * 60, 1)
        elif kind == "edit":
            kw["edited_text"] = text
            kw["final"] = rng.random() < 0.5
        return FeedbackEvent(**common, generation_id=gid, kind=kind, user_id=f"u{rng.randrange(5000)}", **kw)
    if topic == "samples.v1":
        return SampleEvent(
            **common,
            generation_id=gid,
            model="bench",
            policy_version=3,
            prompt=" ".join(rng.choices(WORDS, k=n_prompt // 2)),
            completion=text,
            prompt_token_ids=[rng.randrange(50_000) for _ in range(n_prompt)],
            completion_token_ids=[rng.randrange(50_000) for _ in range(n_completion)],
            completion_logprobs=[round(-rng.random() * 3, 4) for _ in range(n_completion)],
            reward=round(rng.uniform(-1, 1), 3),
            reward_components={"thumb": 1.0, "dwell": 0.25},
            feedback_event_ids=[uuid.UUID(int=rng.getrandbits(128)).hex for _ in range(rng.randint(0, 3))],
            settle_reason=rng.choice(["terminal", "window", "ttl"]),
            user_id=f"u{rng.randrange(5000)}",
            generated_at_ms=t - 5000,
        )
    if topic == "model-updates.v1":
        return ModelUpdateEvent(
            **common,
            model="bench",
            version=i + 1,
            parent_version=i,
            artifact_kind="delta",
            base_version=i,
            artifact_url=f"bench/v{i + 1}.delta",
            sha256="ab" * 32,
            size_bytes=rng.randrange(10**9),
            eval_metrics={"reward": 0.4, "kl": 0.01},
        )
    if topic == "replica-status.v1":
        return ReplicaStatusEvent(
            **common, replica_id=f"replica-{i % 4}", model="bench", version=3, state="serving", engine="vllm"
        )
    if topic == "rollouts.v1":
        return RolloutEvent(
            **common, model="bench", stable_version=2, candidate_version=3, decision="collect", arms={"a": 1.0}
        )
    return DeadLetterEvent(
        **common,
        source_topic="feedback.v1",
        source_partition=0,
        source_offset=i,
        key_b64="Zw==",
        original_b64="e30=",
        error_field="value",
        reason="value: a rating must be between 1 and 5",
        rejected_by="gateway",
    )


def make_messages(n: int, seed: int = 7) -> list[tuple[str, bytes, bytes | None, tuple]]:
    """n (topic, value, key, row) with distinct event ids; rows are what the sink inserts."""
    rng = random.Random(seed)
    templates = {}
    for topic, _ in MIX:
        evs = [_template(topic, rng, i) for i in range(TEMPLATES_PER_TOPIC)]
        spec = SPECS[topic]
        templates[topic] = [(encode(e), key_of(e, BY_NAME[topic].key), spec.row(e)[1:]) for e in evs]
    topics = rng.choices([t for t, _ in MIX], weights=[w for _, w in MIX], k=n)
    placeholder = PLACEHOLDER.encode()
    out = []
    for i, topic in enumerate(topics):
        value, key, row_tail = templates[topic][i % TEMPLATES_PER_TOPIC]
        eid = f"{i:032x}"
        out.append((topic, value.replace(placeholder, eid.encode(), 1), key, (eid, *row_tail)))
    return out


def produce_all(bootstrap: str, prefix: str, messages: list[tuple[str, bytes, bytes | None, tuple]]) -> None:
    """Produce every message (acks=all) and wait until the broker has them all."""
    producer = Producer({**producer_config(bootstrap), "linger.ms": 50, "batch.size": 1_000_000})
    for topic, value, key, _ in messages:
        while True:
            try:
                producer.produce(f"{prefix}{topic}", value, key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    if producer.flush(300) != 0:
        raise RuntimeError("producer did not deliver every message within 300 s")


def bench_sink(bootstrap: str, prefix: str, client, n: int, batch: int, profile: str | None) -> tuple[float, dict]:
    """Seconds from Sink() until n messages are committed, and the sink's stats."""
    from services.sink.settings import SinkSettings
    from services.sink.worker import Sink

    settings = SinkSettings(
        topic_prefix=prefix, sink_group_id="bench", sink_batch_max_events=batch, sink_batch_max_wait_s=0.5
    )
    prof = cProfile.Profile() if profile else None
    start = time.perf_counter()
    sink = Sink(settings, bootstrap, client)
    deadline = time.monotonic() + 1800
    if prof:
        prof.enable()
    while sink.stats.messages < n and time.monotonic() < deadline:
        sink.run_once()
    if prof:
        prof.disable()
    elapsed = time.perf_counter() - start
    stats = sink.stats.as_dict()
    sink.close()
    if prof and profile:
        prof.dump_stats(profile)
    if stats["messages"] < n:
        raise RuntimeError(f"sink committed {stats['messages']} of {n} messages within the deadline")
    return elapsed, stats


def bench_raw(client, messages: list, batch: int, columnar: bool) -> float:
    """Seconds clickhouse-connect takes to insert the same rows, `batch` per insert."""
    by_table: dict[str, list[tuple]] = {}
    for topic, _, _, row in messages:
        by_table.setdefault(topic, []).append(row)
    start = time.perf_counter()
    for topic, rows in by_table.items():
        spec = SPECS[topic]
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            if columnar:
                data = list(zip(*chunk, strict=True))
                client.insert(spec.table, data, column_names=spec.columns, column_oriented=True)
            else:
                client.insert(spec.table, chunk, column_names=spec.columns)
    return time.perf_counter() - start


def distinct_rows(client) -> int:
    """Rows across the sink's tables, deduplicated (FINAL)."""
    return sum(int(client.command(f"SELECT count() FROM {s.table} FINAL")) for s in SPECS.values())


def progress(phase: str, **fields: object) -> None:
    """A progress line on stderr (stdout carries only the result)."""
    print(orjson.dumps({"phase": phase, **fields}).decode(), file=sys.stderr, flush=True)


def main() -> None:
    """Produce, run the sink, run the raw baselines, print the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=None, help="sink_batch_max_events (default: the setting's)")
    parser.add_argument("--profile", default=None, help="write a cProfile of the sink loop to this file")
    args = parser.parse_args()

    from services.clickhouse import migrations
    from services.clickhouse.client import connect
    from services.sink.settings import SinkSettings

    batch = args.batch or SinkSettings.model_fields["sink_batch_max_events"].default
    work = Path(tempfile.mkdtemp(prefix="rlfeed-bench-sink-"))
    broker = None
    url = os.environ.get("RLFEED_KAFKA_URL")
    try:
        if url:
            bootstrap = bootstrap_servers(url)
        else:
            from services.kafka.embedded import EmbeddedBroker

            broker = EmbeddedBroker(work / "broker").start()
            bootstrap = broker.bootstrap
        prefix = f"benchs{uuid.uuid4().hex[:6]}."
        ensure_topics(bootstrap, prefix)
        messages = make_messages(args.events)
        t0 = time.perf_counter()
        produce_all(bootstrap, prefix, messages)
        progress("produced", events=len(messages), seconds=round(time.perf_counter() - t0, 1))

        client = connect(f"chdb://{work / 'chdb'}", "bench_sink")
        migrations.apply(client)
        sink_s, stats = bench_sink(bootstrap, prefix, client, len(messages), batch, args.profile)
        landed = distinct_rows(client)
        progress("sink", seconds=round(sink_s, 2), distinct_rows=landed)

        raw_client = connect(f"chdb://{work / 'chdb'}", "bench_raw")
        migrations.apply(raw_client)
        raw_s = bench_raw(raw_client, messages, batch, columnar=False)
        progress("raw_rows", seconds=round(raw_s, 2))
        col_client = connect(f"chdb://{work / 'chdb'}", "bench_raw_col")
        migrations.apply(col_client)
        col_s = bench_raw(col_client, messages, batch, columnar=True)
        progress("raw_columnar", seconds=round(col_s, 2))

        n = len(messages)
        rate, raw_rate = n / sink_s, n / raw_s
        counts = {t: sum(1 for m in messages if m[0] == t) for t, _ in MIX}
        print(
            orjson.dumps(
                {
                    "events": n,
                    "mix": counts,
                    "batch_max_events": batch,
                    "rows_per_s": round(rate),
                    "raw_insert_rows_per_s": round(raw_rate),
                    "raw_columnar_rows_per_s": round(n / col_s),
                    "ratio": round(rate / raw_rate, 3),
                    "ratio_vs_columnar": round(rate * col_s / n, 3),
                    "sink_seconds": round(sink_s, 2),
                    "distinct_rows_in_clickhouse": landed,
                    "sink_stats": {k: stats[k] for k in ("batches", "messages", "rows", "dead_letters")},
                    "broker": "RLFEED_KAFKA_URL" if url else "embedded noida-db",
                    "clickhouse": "chdb (in process)",
                    "cpus": os.cpu_count(),
                    "load_avg_1m": round(os.getloadavg()[0], 2),
                }
            ).decode()
        )
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
