"""Backpressure: the broker stops under the gateway, then comes back on the same port and
data directory. The gateway must answer 429/503 with Retry-After (never queue without
bound), say clearly that the broker is down, and lose nothing once clients retry."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from schemas.events import FeedbackEvent
from services.apikeys import create_key
from services.kafka.embedded import EmbeddedBroker
from services.kafka.topics import ensure_topics
from services.sdk import AsyncFeedbackClient
from tests.test_gateway_support import read_events, start_gateway, wait_for

MAX_INFLIGHT = 200
"""Four batches of BATCH events."""
BATCH = 50


def batch_of(n: int, tag: str) -> list[dict]:
    return [
        {"event_id": f"{tag}-{i}", "generation_id": f"gen-{i % 7}", "kind": "thumb", "value": 1, "user_id": "u"}
        for i in range(n)
    ]


@pytest.mark.timeout(180)
def test_broker_outage_gives_429_503_bounded_and_recovers_without_loss(tmp_path):
    broker = EmbeddedBroker(tmp_path / "broker").start()
    port = broker.port
    prefix = f"bp{uuid.uuid4().hex[:8]}."
    ensure_topics(broker.bootstrap, prefix)
    keys_file = tmp_path / "keys.json"
    key = create_key(keys_file, "acme")
    auth = {"Authorization": f"Bearer {key}"}
    server = start_gateway(
        broker.bootstrap,
        prefix,
        keys_file,
        produce_timeout_s=2.0,
        max_inflight_events=MAX_INFLIGHT,
        max_batch_events=BATCH,
        broker_probe_interval_s=0.3,
        retry_after_s=1,
    )
    gw = server.gateway
    http = httpx.Client(base_url=server.url, timeout=30, headers=auth)
    accepted: set[str] = set()
    try:
        # 1. Broker up: accepted means written.
        r = http.post("/v1/feedback/batch", json={"events": batch_of(BATCH, "before")})
        assert r.status_code == 200, r.text
        accepted |= set(r.json()["event_ids"])

        def post(events: list[dict]) -> httpx.Response:
            return http.post("/v1/feedback/batch", json={"events": events})

        def flood_with(batches: list[list[dict]]) -> tuple[list[httpx.Response], dict[str, int]]:
            """Send batches from 8 threads while sampling the gateway's in-flight bound."""
            peak = {"inflight": 0, "queue": 0}
            done = threading.Event()

            def sample() -> None:
                while not done.is_set():
                    peak["inflight"] = max(peak["inflight"], gw.sink.inflight)
                    peak["queue"] = max(peak["queue"], gw.sink.pending())
                    time.sleep(0.002)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            with ThreadPoolExecutor(8) as pool:
                answers = list(pool.map(post, batches))
            done.set()
            sampler.join(5)
            assert {a.status_code for a in answers} <= {429, 503}, [a.text for a in answers]
            assert all(a.headers.get("retry-after") == "1" for a in answers)
            assert all(a.json()["error"]["type"] in ("unavailable", "rate_limited") for a in answers)
            # Bounded: never more admitted than the limit, librdkafka never held more.
            assert peak["inflight"] <= MAX_INFLIGHT
            assert peak["queue"] <= MAX_INFLIGHT + gw.settings.dead_letter_max_inflight
            return answers, peak

        # 2. Broker slow (frozen with SIGSTOP: connections stay open, nothing is acknowledged).
        #    The gateway admits up to max_inflight_events, answers 429 beyond, and 503 once the
        #    admitted events time out; then the broker is marked down.
        slow = [batch_of(BATCH, f"slow{j}") for j in range(24)]
        os.kill(broker.proc.pid, signal.SIGSTOP)
        try:
            answers, peak = flood_with(slow)
            assert {a.status_code for a in answers} == {429, 503}
            assert 0 < peak["inflight"] <= MAX_INFLIGHT
            assert http.get("/health").json()["broker"] == "down"
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        wait_for(lambda: http.get("/health").status_code == 200, 30, "the gateway to see the broker again")

        # 3. Broker gone: the same flood is refused at once with 503.
        broker.stop()
        flood = [batch_of(BATCH, f"outage{j}") for j in range(16)]
        answers, _ = flood_with(flood)
        assert 503 in {a.status_code for a in answers}
        # Clear status: health says the broker is down, and new requests fail fast with 503.
        health = http.get("/health")
        assert health.status_code == 503 and health.json()["broker"] == "down"
        r = post(batch_of(1, "fast"))
        assert r.status_code == 503 and "unavailable" in r.json()["error"]["message"]
        assert gw.sink.inflight == 0

        # 4. An SDK client keeps sending through the outage; it backs off and retries.
        sdk_ids: list[str] = []
        sdk_stats = {}

        async def sdk_run() -> None:
            async with AsyncFeedbackClient(
                url=server.url,
                api_key=key,
                batch_linger_s=0.01,
                backoff_initial_s=0.1,
                backoff_max_s=1.0,
                max_attempts=1000,
            ) as client:
                for i in range(30):
                    sdk_ids.append(await client.feedback(f"gen-{i}", "rating", 4, user_id="u"))
                await client.flush(timeout_s=90)
                sdk_stats["stats"] = client.stats

        sdk_thread = threading.Thread(target=asyncio.run, args=(sdk_run(),), daemon=True)
        sdk_thread.start()
        time.sleep(1.0)  # let the client meet the outage first

        # 5. The broker returns on the same port and data directory.
        broker = EmbeddedBroker(tmp_path / "broker", port=port).start()
        wait_for(lambda: http.get("/health").status_code == 200, 30, "the gateway to see the broker again")

        # 6. Clients retry what was refused, with the same event ids.
        for events in slow + flood:
            for _ in range(60):
                r = post(events)
                if r.status_code == 200:
                    break
                time.sleep(float(r.headers.get("retry-after", "1")))
            assert r.status_code == 200, r.text
            accepted |= set(r.json()["event_ids"])
        sdk_thread.join(120)
        assert not sdk_thread.is_alive()
        stats = sdk_stats["stats"]
        assert stats.sent == 30 and stats.failed == 0 and stats.retries > 0
        accepted |= set(sdk_ids)

        # 7. Nothing lost. Events that timed out while the broker was frozen may have been
        #    written anyway once it resumed, and then again by the retry: only those may be
        #    doubled, and consumers drop them by event_id (the second dedupe layer).
        written = read_events(broker.bootstrap, f"{prefix}feedback.v1", FeedbackEvent)
        ids = [e.event_id for e in written]
        assert set(ids) == accepted
        assert len(accepted) == BATCH * (1 + len(slow) + len(flood)) + 30
        doubled = {i for i, n in Counter(ids).items() if n > 1}
        assert all(i.startswith("slow") for i in doubled), sorted(doubled)[:5]
    finally:
        http.close()
        server.stop()
        broker.stop()
