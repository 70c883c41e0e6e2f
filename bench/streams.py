"""Benchmark of the streams join: prints one JSON object.

On the same events (a mix of generations and feedback: out of order, duplicated,
terminal and not), measured in one run:

- `events_per_s`: the hot path (`streams.hot_path.HotPath`, one worker) consuming,
  joining, computing rewards, producing samples + changelog + dead letters, flushing and
  committing, from the first fetched batch until every event is consumed.
- `raw_forward_events_per_s`: a raw confluent-kafka loop consuming the same events and
  producing each one unchanged (consume, produce, flush, commit per batch).
- `faust_table_events_per_s`: the same join written the plain way, a Faust agent over
  both topics with a Table keyed by generation id, on the first `--faust-events` events
  (`--faust-events 0` skips it).
- `join_cpu_s`, `raw_cpu_s`: this process's CPU seconds in each of the first two phases
  (the broker runs in another process); on a shared machine they are steadier than the
  wall-clock rates. `join_thread_cpu_s` splits the join's between Python threads and
  librdkafka's own threads (Linux /proc).

The events are encoded once and the pydantic objects dropped before anything is
measured, and the garbage collector is tuned as in the worker process
(`streams.hot_path.tune_gc`), so that the join runs with the heap a worker has.

Usage: `python bench/streams.py [--events 100000] [--faust-events 6000]`
(`RLFEED_KAFKA_URL` picks a running broker; otherwise an embedded one is started).
"""

# ruff: noqa: E402 - the imports must follow the sys.path fix below
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# This file is named like the `streams` package: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.codec import encode
from schemas.events import FeedbackEvent, GenerationEvent
from schemas.topics import FEEDBACK, GENERATIONS, JOIN_PARTITIONS, SAMPLES
from services.kafka.producers import producer_config
from services.kafka.topics import ensure_topics
from services.kafka.url import bootstrap_servers
from streams.hot_path import tune_gc

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
KINDS = ["thumb", "rating", "accept", "reject", "copy", "regenerate", "dwell", "edit"]


def make_events(n: int, seed: int = 7) -> list[GenerationEvent | FeedbackEvent]:
    """About n events: generations with 0-3 feedback each, ~10% feedback first, ~2% duplicates."""
    rng = random.Random(seed)
    t0 = int(time.time() * 1000) - 60_000
    out: list[GenerationEvent | FeedbackEvent] = []
    i = 0
    while len(out) < n:
        gid = f"g{i:08d}"
        t = t0 + i
        n_prompt, n_completion = rng.randint(24, 72), rng.randint(24, 72)
        completion = " ".join(rng.choices(WORDS, k=n_completion // 2))
        gen = GenerationEvent(
            generation_id=gid,
            event_time_ms=t,
            model="bench",
            policy_version=3,
            prompt=" ".join(rng.choices(WORDS, k=n_prompt // 2)),
            completion=completion,
            prompt_token_ids=[rng.randrange(50_000) for _ in range(n_prompt)],
            completion_token_ids=[rng.randrange(50_000) for _ in range(n_completion)],
            completion_logprobs=[round(-rng.random() * 3, 4) for _ in range(n_completion)],
            user_id=f"u{rng.randrange(5000)}",
        )
        fbs = []
        for j in range(rng.choice([0, 1, 1, 2, 2, 3])):
            kind = rng.choice(KINDS)
            kw: dict = {}
            if kind == "thumb":
                kw["value"] = rng.choice([1, -1])
            elif kind == "rating":
                kw["value"] = rng.randint(1, 5)
            elif kind == "dwell":
                kw["value"] = round(rng.random() * 60, 1)
            elif kind == "edit":
                kw["edited_text"] = completion.replace("bad", "good")
                kw["final"] = rng.random() < 0.5
            fbs.append(
                FeedbackEvent(generation_id=gid, event_time_ms=t + 100 * (j + 1), kind=kind, user_id=gen.user_id, **kw)
            )
        group: list = [gen, *fbs]
        if fbs and rng.random() < 0.1:
            group = [fbs[0], gen, *fbs[1:]]
        if fbs and rng.random() < 0.02:
            group.append(fbs[-1])
        out.extend(group)
        i += 1
    return out[:n]


def encode_all(events: list[GenerationEvent | FeedbackEvent]) -> list[tuple[bool, bytes, bytes]]:
    """(is_generation, key, value) of every event."""
    return [(isinstance(e, GenerationEvent), e.generation_id.encode(), encode(e)) for e in events]


def produce_all(bootstrap: str, prefix: str, events: list[tuple[bool, bytes, bytes]]) -> None:
    producer = Producer({**producer_config(bootstrap), "linger.ms": 20, "batch.size": 1_000_000})
    for is_gen, key, value in events:
        topic = GENERATIONS if is_gen else FEEDBACK
        while True:
            try:
                producer.produce(topic.full_name(prefix), value, key)
                break
            except BufferError:
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this process's threads by kind: `python` (the join's own
    thread and any other Python thread) and `librdkafka` (its `rdk:` threads: fetching,
    producing, the broker connections); {} where /proc is not there."""
    out = {"python": 0.0, "librdkafka": 0.0}
    try:
        tick = os.sysconf("SC_CLK_TCK")
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out["librdkafka" if name.startswith("rdk:") else "python"] += (int(fields[11]) + int(fields[12])) / tick
    except (OSError, ValueError):
        return {}
    return out


def bench_join(bootstrap: str, prefix: str, n: int) -> tuple[float, dict]:
    from streams.hot_path import HotPath
    from streams.settings import StreamsSettings

    settings = StreamsSettings(
        kafka_url=bootstrap, topic_prefix=prefix, group_id=f"bench-join-{uuid.uuid4().hex[:6]}", batch_max_messages=5000
    )
    hot = HotPath(settings, bootstrap)
    start = cpu_start = None
    deadline = time.monotonic() + 600
    while hot.stats["consumed"] < n and time.monotonic() < deadline:
        got = hot.run_once()
        if got and start is None:
            start, cpu_start, threads_start = time.perf_counter(), time.process_time(), thread_cpu_s()
    elapsed = time.perf_counter() - (start or time.perf_counter())
    stats = dict(hot.stats)
    stats["cpu_s"] = time.process_time() - (cpu_start or time.process_time())
    if start is not None:
        threads_end = thread_cpu_s()  # threads that ended meanwhile (a closed consumer) are left out
        stats["thread_cpu_s"] = {k: round(v - threads_start.get(k, 0.0), 2) for k, v in threads_end.items()}
    hot.close()
    return elapsed, stats


def bench_raw(bootstrap: str, prefix: str, n: int, out_topic: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of the raw forward."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-raw-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "range",
        }
    )
    producer = Producer(
        {
            **producer_config(bootstrap),
            "acks": "all",
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 1_000_000,
        }
    )
    consumer.subscribe([GENERATIONS.full_name(prefix), FEEDBACK.full_name(prefix)])
    count, start = 0, None
    deadline = time.monotonic() + 600
    while count < n and time.monotonic() < deadline:
        msgs = consumer.consume(num_messages=5000, timeout=0.2)
        if not msgs:
            continue
        if start is None:
            start, cpu_start = time.perf_counter(), time.process_time()
        offsets = {}
        for m in msgs:
            if m.error():
                continue
            producer.produce(out_topic, m.value(), m.key(), m.partition())
            offsets[(m.topic(), m.partition())] = m.offset()
        producer.flush(30)
        consumer.commit(offsets=[TopicPartition(t, p, o + 1) for (t, p), o in offsets.items()], asynchronous=False)
        count += len(msgs)
    elapsed = time.perf_counter() - (start or time.perf_counter())
    cpu = time.process_time() - cpu_start if start is not None else 0.0
    consumer.close()
    return elapsed, cpu


FAUST_WORKER = r"""
import os, sys, time, signal, orjson, faust
bootstrap, prefix, n, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
app = faust.App(f"{prefix}bench-faust", broker=f"kafka://{bootstrap}", store="memory://", web_enabled=False,
                topic_partitions=8, consumer_auto_offset_reset="earliest")
topics = app.topic(f"{prefix}generations.v1", f"{prefix}feedback.v1", key_serializer="raw", value_serializer="raw")
samples = app.topic(f"{prefix}samples.v1", key_serializer="raw", value_serializer="raw")
table = app.Table("join", default=None, partitions=8)
TERMINAL = {"accept", "reject"}
state = {"count": 0, "start": None}

@app.agent(topics)
async def join(stream):
    async for key, raw in stream.items():
        if state["start"] is None:
            state["start"] = time.perf_counter()
        ev = orjson.loads(raw)
        gid = ev["generation_id"]
        entry = table.get(gid) or {"gen": None, "fb": []}
        if "kind" in ev:
            if ev["event_id"] not in entry["fb"]:
                entry["fb"] = entry["fb"] + [ev["event_id"]]
            terminal = ev["kind"] in TERMINAL or (ev["kind"] == "edit" and ev.get("final"))
        else:
            entry["gen"] = ev
            terminal = False
        if entry["gen"] is not None and terminal:
            await samples.send(key=gid.encode(), value=orjson.dumps({"g": gid, "fb": entry["fb"]}))
            table[gid] = None
        else:
            table[gid] = entry
        state["count"] += 1
        if state["count"] >= n:
            elapsed = time.perf_counter() - state["start"]
            open(out_path, "w").write(orjson.dumps({"elapsed": elapsed, "count": state["count"]}).decode())
            os.kill(os.getpid(), signal.SIGTERM)

faust.Worker(app, loglevel="warning", quiet=True, redirect_stdouts=False).execute_from_commandline()
"""


def bench_faust(bootstrap: str, prefix: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "faust.json"
        script = Path(tmp) / "faust_worker.py"
        script.write_text(FAUST_WORKER)
        proc = subprocess.Popen(
            [sys.executable, str(script), bootstrap, prefix, str(n), str(out)],
            cwd=tmp,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not out.exists():
            raise RuntimeError("the Faust table worker did not finish")
        return orjson.loads(out.read_bytes())["elapsed"]


def progress(phase: str, **fields: object) -> None:
    """One progress line on stderr (stdout carries only the result)."""
    print(orjson.dumps({"phase": phase, **fields}).decode(), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--faust-events", type=int, default=6000)
    args = parser.parse_args()

    broker = None
    broker_dir: Path | None = None
    url = os.environ.get("RLFEED_KAFKA_URL")
    if url:
        bootstrap = bootstrap_servers(url)
    else:
        from services.kafka.embedded import EmbeddedBroker

        broker_dir = Path(tempfile.mkdtemp(prefix="rlfeed-bench-"))
        broker = EmbeddedBroker(broker_dir).start()
        bootstrap = broker.bootstrap
    try:
        encoded = encode_all(make_events(args.events))  # the pydantic objects go here
        n_gen = sum(is_gen for is_gen, _, _ in encoded)
        prefix = f"bench{uuid.uuid4().hex[:6]}."
        faust_prefix = f"benchf{uuid.uuid4().hex[:6]}."
        raw_prefix = f"benchr{uuid.uuid4().hex[:6]}."
        ensure_topics(bootstrap, raw_prefix)
        ensure_topics(bootstrap, prefix)
        ensure_topics(bootstrap, faust_prefix)
        produce_all(bootstrap, prefix, encoded)
        if args.faust_events:
            produce_all(bootstrap, faust_prefix, encoded[: args.faust_events])
        n_events = len(encoded)
        del encoded

        progress("produced", events=n_events)
        tune_gc()
        join_s, stats = bench_join(bootstrap, prefix, n_events)
        progress("join", seconds=round(join_s, 2), cpu_s=round(stats["cpu_s"], 2))
        raw_s, raw_cpu_s = bench_raw(bootstrap, prefix, n_events, SAMPLES.full_name(raw_prefix))
        progress("raw", seconds=round(raw_s, 2), cpu_s=round(raw_cpu_s, 2))
        faust_s = bench_faust(bootstrap, faust_prefix, args.faust_events) if args.faust_events else None
        progress("faust", seconds=None if faust_s is None else round(faust_s, 2))

        join_rate = n_events / join_s
        raw_rate = n_events / raw_s
        faust_rate = args.faust_events / faust_s if faust_s else None
        print(
            orjson.dumps(
                {
                    "events": n_events,
                    "generations": n_gen,
                    "feedback": n_events - n_gen,
                    "partitions": JOIN_PARTITIONS,
                    "events_per_s": round(join_rate),
                    "raw_forward_events_per_s": round(raw_rate),
                    "ratio": round(join_rate / raw_rate, 3),
                    "faust_table_events": args.faust_events,
                    "faust_table_events_per_s": None if faust_rate is None else round(faust_rate),
                    "speedup_vs_faust": None if faust_rate is None else round(join_rate / faust_rate, 1),
                    "join_cpu_s": round(stats["cpu_s"], 2),
                    "raw_cpu_s": round(raw_cpu_s, 2),
                    "join_thread_cpu_s": stats.get("thread_cpu_s", {}),
                    "join_stats": {k: stats.get(k, 0) for k in ("samples", "dead_letters", "duplicates", "produced")},
                    "samples_topic": SAMPLES.name,
                    "broker": "RLFEED_KAFKA_URL" if url else "embedded noida-db",
                }
            ).decode()
        )
    finally:
        if broker is not None:
            broker.stop()
        if broker_dir is not None:
            shutil.rmtree(broker_dir, ignore_errors=True)  # the broker's log: ~0.5 GB per run


if __name__ == "__main__":
    main()
