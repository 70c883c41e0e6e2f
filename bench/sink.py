"""Benchmark of the ClickHouse sink: prints one JSON object.

N events of a realistic mix (mostly generations, feedback and samples; a few model
updates, replica statuses, rollouts and dead letters) are produced to the broker first.
Then, in one run:

- `rows_per_s`: the sink (`services.sink.worker.Sink.run`, as `rlfeed sink` runs it: one
  consumer, decoding overlapped with inserting, chdb in this process, PII redaction as
  the environment configures it) from its construction (group join included) until
  every event is inserted and its offsets are committed.
- the raw baseline: clickhouse-connect inserting the same rows (already mapped, already
  redacted: no Kafka, no decoding, no validation) into a fresh database with the same
  tables, row-oriented and column-oriented, with the sink's batch (`--batch` rows per
  insert and table) and with one insert per table (the best batching there is).
  `raw_insert_rows_per_s` is the best of these four; each one is in `raw`.
- `ratio`: rows_per_s / raw_insert_rows_per_s.
- `sink_cpu_us_per_msg`: CPU this process spent per message while the sink ran (every
  thread: decoding, librdkafka's, chdb's), `raw_insert_cpu_us_per_row` the same for the
  best raw insert, `cpu_ratio` their ratio: figures that a loaded machine disturbs far
  less than the rates (the broker, a separate process, is in neither);
  `consume_only_cpu_us_per_msg` is the bare consumer's share of the sink's CPU.
- `sink_thread_cpu_us_per_msg`: the CPU per message of the sink's decoding thread
  (`poll_decode`: consume, decode, rows; Python holding the GIL nearly all of it) and of
  its insert thread (`insert`: the JSON document, then chdb parsing and writing it
  without the GIL, on that thread).
- `consume_only_msgs_per_s`: a bare confluent-kafka consumer reading the same messages
  (no decoding, no insert): the Kafka side's own limit in this run.

With `--split`, `cpu_us_per_msg_by_stage` adds the CPU per message of each stage of the
sink's hot path measured offline (`stage_split`) and the bare consumer's.

Usage: `python bench/sink.py [--events 1000000] [--batch 50000] [--split]
[--sink-insert json|columns]` (`RLFEED_KAFKA_URL` picks a running broker; otherwise an
embedded noida-db is started in a temporary directory, stopped by pid and deleted
afterwards). Profile the sink with py-spy:
`py-spy record -o sink.svg -- python bench/sink.py --events 200000`.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
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


class ColumnInsertSink:
    """`--sink-insert columns`: the sink as it inserted before its JSON inserts, for a
    same-run comparison: clickhouse-connect's column-oriented insert (its Python-side
    serialisation), the column types asked once per table."""

    def __init__(self, sink) -> None:
        self.sink = sink
        self.types: dict[str, object] = {}

    def __call__(self, table: str, batch: list[tuple]) -> None:
        spec, client = self.sink._specs[table], self.sink.client
        if table not in self.types:
            self.types[table] = client.create_insert_context(table, spec.columns).column_types
        columns = list(zip(*batch, strict=True))
        client.insert(table, columns, column_names=spec.columns, column_types=self.types[table], column_oriented=True)


def bench_sink(
    bootstrap: str, prefix: str, client, n: int, batch: int, insert: str = "json"
) -> tuple[float, float, dict, dict]:
    """Seconds from Sink() until n messages are committed, the CPU seconds this process
    used meanwhile (every thread: decoding, librdkafka, chdb), the sink's stats, and the
    CPU seconds of the sink's two Python threads: `poll_decode` (consume, decode, rows)
    and `insert` (the JSON document, chdb's parsing and writing on that thread)."""
    from services.sink.settings import SinkSettings
    from services.sink.worker import Sink

    settings = SinkSettings(
        topic_prefix=prefix, sink_group_id="bench", sink_batch_max_events=batch, sink_batch_max_wait_s=0.5
    )
    stop = threading.Event()
    start, cpu_start = time.perf_counter(), time.process_time()
    sink = Sink(settings, bootstrap, client)
    if insert == "columns":
        sink._insert_table = ColumnInsertSink(sink)  # type: ignore[method-assign]
    runner = threading.Thread(target=sink.run, args=(stop,), name="sink")
    runner.start()
    deadline = time.monotonic() + 1800
    while sink.stats.messages < n and time.monotonic() < deadline and runner.is_alive():
        time.sleep(0.005)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    threads = {"poll_decode": _thread_cpu(runner)}
    threads["insert"] = sum(_thread_cpu(t) for t in threading.enumerate() if t.name.startswith("sink-insert"))
    stop.set()
    runner.join()
    stats = sink.stats.as_dict()
    sink.close()
    if stats["messages"] < n:
        raise RuntimeError(f"sink committed {stats['messages']} of {n} messages within the deadline")
    return elapsed, cpu, stats, threads


def _thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds a running thread has used (0 when it has ended)."""
    try:
        return time.clock_gettime(time.pthread_getcpuclockid(thread.ident or 0))
    except (OSError, ValueError):
        return 0.0


def bench_raw(client, messages: list, batch: int | None, columnar: bool) -> tuple[float, float]:
    """Seconds (and CPU seconds of this process) clickhouse-connect takes to insert the
    same rows, `batch` per insert and table (None: all of a table's rows in one insert)."""
    by_table: dict[str, list[tuple]] = {}
    for topic, _, _, row in messages:
        by_table.setdefault(topic, []).append(row)
    start, cpu_start = time.perf_counter(), time.process_time()
    for topic, rows in by_table.items():
        spec = SPECS[topic]
        step = batch or len(rows)
        for i in range(0, len(rows), step):
            chunk = rows[i : i + step]
            if columnar:
                data = list(zip(*chunk, strict=True))
                client.insert(spec.table, data, column_names=spec.columns, column_oriented=True)
            else:
                client.insert(spec.table, chunk, column_names=spec.columns)
    return time.perf_counter() - start, time.process_time() - cpu_start


def bench_consume(bootstrap: str, prefix: str, n: int, batch: int) -> tuple[float, float]:
    """Seconds (and CPU seconds of this process) a bare confluent-kafka consumer (a new
    group, the sink's consumer settings, `consume(batch)`, reading each value, no
    decoding) takes to read the n messages: the Kafka share of the sink's time."""
    from confluent_kafka import Consumer

    from schemas.topics import PUBLIC_TOPICS

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{prefix}bench-consume",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "receive.message.max.bytes": 2_147_483_647,
        }
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    consumer.subscribe([t.full_name(prefix) for t in PUBLIC_TOPICS])
    got, deadline = 0, time.monotonic() + 1800
    while got < n and time.monotonic() < deadline:
        for msg in consumer.consume(batch, 0.5):
            if msg.error() is None:
                msg.value()
                got += 1
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    consumer.close()
    if got < n:
        raise RuntimeError(f"the bare consumer read {got} of {n} messages within the deadline")
    return elapsed, cpu


def stage_split(messages: list, batch: int, url: str) -> dict[str, float]:
    """CPU microseconds per message of each stage of the sink's hot path, offline (no
    Kafka; GC paused as the sink pauses it; `batch` messages at a time): decode and
    validate (`counted_batch_decoder`), row mapping, redaction (the row functions with
    redaction less without), columns (the JSON document of columns the sink sends,
    `rows.json_columns`), insert (`raw_insert` into chdb, as the sink does: ClickHouse
    parsing it in C++, the MergeTree write and the materialized views)."""
    from schemas.fast import counted_batch_decoder
    from services.clickhouse import migrations
    from services.clickhouse.client import connect
    from services.sink.rows import INSERT_FORMAT, json_columns
    from services.sink.worker import INSERT_SETTINGS, gc_paused

    client = connect(url, "bench_split")
    migrations.apply(client)
    cpu = dict.fromkeys(("decode_validate", "row_mapping", "redaction", "columns", "insert"), 0.0)
    clock = time.process_time
    for start in range(0, len(messages), batch):
        by_topic: dict[str, list[bytes]] = {}
        for topic, value, _, _ in messages[start : start + batch]:
            by_topic.setdefault(topic, []).append(value)
        for topic, values in by_topic.items():
            spec = SPECS[topic]
            plain = getattr(spec.row, "__wrapped__", spec.row)
            with gc_paused():
                t0 = clock()
                structs = counted_batch_decoder(BY_NAME[topic].event)(values)
                t1 = clock()
                [plain(s) for s in structs]
                t2 = clock()
                rows = [spec.row(s) for s in structs]
                t3 = clock()
                body = json_columns(spec, rows)
                t4 = clock()
                client.raw_insert(
                    spec.table, spec.columns, insert_block=body, fmt=INSERT_FORMAT, settings=INSERT_SETTINGS
                )
                t5 = clock()
            cpu["decode_validate"] += t1 - t0
            cpu["row_mapping"] += t2 - t1
            cpu["redaction"] += max(0.0, (t3 - t2) - (t2 - t1))
            cpu["columns"] += t4 - t3
            cpu["insert"] += t5 - t4
    return {k: round(v / len(messages) * 1e6, 2) for k, v in cpu.items()}


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
    parser.add_argument(
        "--redaction",
        choices=("env", "off"),
        default="env",
        help="PII redaction in the sink's rows: as RLFEED_REDACT_* say (default: on), or off",
    )
    parser.add_argument(
        "--sink-insert",
        choices=("json", "columns"),
        default="json",
        help="the sink's insert: JSONCompactColumns parsed by ClickHouse (default, as `rlfeed sink`), or "
        "clickhouse-connect's column insert (the previous one, to compare in the same conditions)",
    )
    parser.add_argument(
        "--split",
        action="store_true",
        help="also measure the CPU per message of each stage offline (`stage_split`)",
    )
    args = parser.parse_args()

    from services.clickhouse import migrations
    from services.clickhouse.client import connect
    from services.privacy import redact
    from services.sink.settings import SinkSettings

    batch = args.batch or SinkSettings.model_fields["sink_batch_max_events"].default
    if args.redaction == "off":
        redact.configure(None)
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

        load_before = os.getloadavg()[0]
        client = connect(f"chdb://{work / 'chdb'}", "bench_sink")
        migrations.apply(client)
        sink_s, sink_cpu_s, stats, thread_cpu = bench_sink(
            bootstrap, prefix, client, len(messages), batch, args.sink_insert
        )
        landed = distinct_rows(client)
        progress("sink", seconds=round(sink_s, 2), distinct_rows=landed)

        n = len(messages)
        consume_s, consume_cpu_s = bench_consume(bootstrap, prefix, n, batch)
        progress("consume_only", seconds=round(consume_s, 2))
        raw: dict[str, int] = {}
        raw_cpu: dict[str, float] = {}
        for columnar in (False, True):
            for chunk in (batch, None):
                name = f"{'columns' if columnar else 'rows'}_{'all' if chunk is None else chunk}_per_insert"
                raw_client = connect(f"chdb://{work / 'chdb'}", f"bench_raw_{len(raw)}")
                migrations.apply(raw_client)
                seconds, cpu_s = bench_raw(raw_client, messages, chunk, columnar)
                raw[name] = round(n / seconds)
                raw_cpu[name] = cpu_s
                progress("raw", variant=name, seconds=round(seconds, 2))

        split = stage_split(messages, batch, f"chdb://{work / 'chdb'}") if args.split else None
        if split is not None:
            split["consume"] = round(consume_cpu_s / n * 1e6, 2)
            progress("split", **split)
        rate, raw_best = n / sink_s, max(raw.values())
        raw_cpu_best = min(raw_cpu.values())
        counts = {t: sum(1 for m in messages if m[0] == t) for t, _ in MIX}
        print(
            orjson.dumps(
                {
                    "events": n,
                    "mix": counts,
                    "batch_max_events": batch,
                    "rows_per_s": round(rate),
                    "raw_insert_rows_per_s": raw_best,
                    "ratio": round(rate / raw_best, 3),
                    "raw": raw,
                    "consume_only_msgs_per_s": round(n / consume_s),
                    "sink_seconds": round(sink_s, 2),
                    "sink_cpu_us_per_msg": round(sink_cpu_s / n * 1e6, 2),
                    "sink_thread_cpu_us_per_msg": {k: round(v / n * 1e6, 2) for k, v in thread_cpu.items()},
                    "raw_insert_cpu_us_per_row": round(raw_cpu_best / n * 1e6, 2),
                    "consume_only_cpu_us_per_msg": round(consume_cpu_s / n * 1e6, 2),
                    "cpu_ratio": round(raw_cpu_best / sink_cpu_s, 3),
                    "distinct_rows_in_clickhouse": landed,
                    **({"cpu_us_per_msg_by_stage": split} if split is not None else {}),
                    "sink_stats": {k: stats[k] for k in ("batches", "messages", "rows", "dead_letters", "slow_path")},
                    "sink_insert": args.sink_insert,
                    "redaction": redact.current() is not None,
                    "broker": "RLFEED_KAFKA_URL" if url else "embedded noida-db",
                    "clickhouse": "chdb (in process)",
                    "cpus": os.cpu_count(),
                    "load_avg_1m": {"before_sink": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
                }
            ).decode()
        )
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
