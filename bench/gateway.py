"""Gateway throughput and latency on loopback, next to a direct aiokafka producer.

Starts a broker (RLFEED_KAFKA_URL's, or an embedded noida-db), the gateway as its own
process (`python -m services.gateway.main`, one uvicorn worker), and an asyncio/httpx
load generator in this process. Measures accepted events/s (200 = acknowledged by Kafka
with acks=all) and request latency p50/p99 for single-event and batch requests, then the
rate of a direct aiokafka producer (acks=all) on the same broker in the same run.
Prints one JSON object.

    python bench/gateway.py [--seconds 5] [--concurrency 8] [--batch 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def feedback_body(i: int) -> dict:
    return {
        "event_id": uuid.uuid4().hex,
        "generation_id": f"gen-{i % 10_000}",
        "kind": "rating",
        "value": 1 + i % 5,
        "user_id": f"user-{i % 997}",
        "session_id": "bench",
    }


async def load(url: str, key: str, seconds: float, concurrency: int, batch: int) -> dict:
    """`concurrency` workers post for `seconds`; batch=0 posts single events."""
    import httpx

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    accepted = 0
    counter = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as http:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal accepted, counter
            while time.perf_counter() < deadline:
                counter += 1
                if batch:
                    body = orjson.dumps({"events": [feedback_body(counter * batch + j) for j in range(batch)]})
                    path, n = "/v1/feedback/batch", batch
                else:
                    body, path, n = orjson.dumps(feedback_body(counter)), "/v1/feedback", 1
                t0 = time.perf_counter()
                resp = await http.post(path, content=body)
                latencies.append(time.perf_counter() - t0)
                statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                if resp.status_code == 200:
                    accepted += n

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {
        "events_per_request": max(batch, 1),
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "requests": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "accepted_events": accepted,
        "accepted_events_per_s": round(accepted / elapsed, 1),
        "latency_p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
        "latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
    }


async def direct_aiokafka(bootstrap: str, topic: str, n: int) -> dict:
    """Send `n` events with aiokafka (acks=all) as fast as it goes."""
    from aiokafka import AIOKafkaProducer

    from schemas.codec import encode
    from schemas.events import FeedbackEvent

    values = [
        (ev.generation_id.encode(), encode(ev))
        for ev in (FeedbackEvent.model_validate(feedback_body(i) | {"tenant_id": "bench"}) for i in range(n))
    ]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_batch_size=256 * 1024)
    await producer.start()
    try:
        t0 = time.perf_counter()
        futures = [await producer.send(topic, value, key=key) for key, value in values]
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - t0
    finally:
        await producer.stop()
    return {"events": n, "seconds": round(elapsed, 2), "events_per_s": round(n / elapsed, 1)}


def written(bootstrap: str, topic: str) -> int:
    """Messages in `topic` (sum of end offsets)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{uuid.uuid4().hex}"})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        return sum(c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
    finally:
        c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each load phase")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent connections (batch phase: a quarter)")
    ap.add_argument("--batch", type=int, default=100, help="events per batch request")
    ap.add_argument("--direct-events", type=int, default=100_000, help="events for the aiokafka comparison")
    args = ap.parse_args()

    from services.apikeys import create_key
    from services.kafka.embedded import EmbeddedBroker, free_port
    from services.kafka.topics import ensure_topics
    from services.kafka.url import bootstrap_servers

    tmp = Path(tempfile.mkdtemp(prefix="rlfeed-bench-gateway-"))
    broker = None
    if os.environ.get("RLFEED_KAFKA_URL"):
        bootstrap = bootstrap_servers(os.environ["RLFEED_KAFKA_URL"])
    else:
        broker = EmbeddedBroker(tmp / "broker").start()
        bootstrap = broker.bootstrap
    prefix = f"bench{uuid.uuid4().hex[:8]}."
    ensure_topics(bootstrap, prefix)
    keys_file = tmp / "keys.json"
    key = create_key(keys_file, "bench")
    port = free_port()
    env = os.environ | {
        "RLFEED_KAFKA_URL": f"kafka://{bootstrap}",
        "RLFEED_TOPIC_PREFIX": prefix,
        "RLFEED_KEYS_FILE": str(keys_file),
        "RLFEED_PORT": str(port),
        "RLFEED_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
    }
    gateway = subprocess.Popen([sys.executable, "-m", "services.gateway.main"], env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise SystemExit("the gateway did not start")
            time.sleep(0.1)
        asyncio.run(load(url, key, 1.0, args.concurrency, args.batch))  # warm-up
        single = asyncio.run(load(url, key, args.seconds, args.concurrency, 0))
        batch = asyncio.run(load(url, key, args.seconds, max(1, args.concurrency // 4), args.batch))
        topic = f"{prefix}feedback.v1"
        on_topic = written(bootstrap, topic)
        direct = asyncio.run(direct_aiokafka(bootstrap, f"{prefix}generations.v1", args.direct_events))
        best = max(single["accepted_events_per_s"], batch["accepted_events_per_s"])
        out = {
            "broker": "RLFEED_KAFKA_URL" if broker is None else "embedded noida-db",
            "gateway_single": single,
            "gateway_batch": batch,
            "written_to_feedback_topic": on_topic,
            "aiokafka_direct": direct,
            "ratio_gateway_single_vs_direct": round(single["accepted_events_per_s"] / direct["events_per_s"], 3),
            "ratio_gateway_batch_vs_direct": round(batch["accepted_events_per_s"] / direct["events_per_s"], 3),
            "ratio_best_vs_direct": round(best / direct["events_per_s"], 3),
            "cpu_count": os.cpu_count(),
        }
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    finally:
        gateway.terminate()
        try:
            gateway.wait(30)
        except subprocess.TimeoutExpired:
            gateway.kill()
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
