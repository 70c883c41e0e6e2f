"""The Python SDK: pure parts (backoff, body splitting, retry bookkeeping) and real
delivery over HTTP (to a running gateway) and straight to Kafka."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid

import orjson
import pytest
from pydantic import ValidationError

from schemas.events import FeedbackEvent, GenerationEvent
from schemas.topics import FEEDBACK
from services.sdk import AsyncFeedbackClient, FeedbackClient, backoff_delay
from services.sdk.transports import HttpTransport, Rejected, Retryable, Transport
from tests import test_gateway_support as support
from tests.factories import generation
from tests.test_gateway_support import GatewayEnv, read_events

gateway_env = support.gateway_env


# -- pure parts --------------------------------------------------------------------------
def test_backoff_grows_caps_and_honours_retry_after():
    assert backoff_delay(1, 0.1, 10, jitter=0.0) == pytest.approx(0.05)
    assert backoff_delay(1, 0.1, 10, jitter=1.0) == pytest.approx(0.1)
    assert backoff_delay(4, 0.1, 10, jitter=1.0) == pytest.approx(0.8)
    assert backoff_delay(30, 0.1, 10, jitter=1.0) == pytest.approx(10)
    assert backoff_delay(1, 0.1, 10, retry_after_s=3, jitter=0.0) == pytest.approx(3)
    assert backoff_delay(1, 0.1, 10, retry_after_s=300, jitter=0.0) == pytest.approx(10)


def test_http_bodies_stay_under_the_request_limit():
    transport = HttpTransport("http://127.0.0.1:1", "k", max_request_bytes=2000)
    events = [FeedbackEvent(generation_id=f"g{i}", kind="copy", user_id="u") for i in range(40)]
    bodies = transport.bodies(events)
    assert len(bodies) > 1 and all(len(b) <= 2000 for _, b in bodies)
    sent = [e for _, b in bodies for e in orjson.loads(b)["events"]]
    assert [e["event_id"] for e in sent] == [e.event_id for e in events]
    assert all("tenant_id" not in e for e in sent)  # the gateway sets it from the key
    assert bodies[0][0] == 0


def test_feedback_is_validated_at_the_call():
    client = AsyncFeedbackClient(url="http://127.0.0.1:1", api_key="k", flush_at_exit=False)
    with pytest.raises(ValidationError, match="thumb must be"):
        client.build_feedback("g1", "thumb", 3, user_id="u")
    with pytest.raises(ValueError, match="api_key"):
        AsyncFeedbackClient(url="http://x", flush_at_exit=False)


class ScriptedTransport(Transport):
    """Answers each send with the next scripted outcome (None: delivered)."""

    def __init__(self, outcomes: list[Exception | None]) -> None:
        self.outcomes = outcomes
        self.calls: list[list[str]] = []

    async def send(self, topic, events) -> None:
        self.calls.append([e.event_id for e in events])
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if outcome is not None:
            raise outcome


async def test_retries_keep_event_ids_and_drop_only_the_rejected_event():
    client = AsyncFeedbackClient(
        url="http://x", api_key="k", backoff_initial_s=0.001, backoff_max_s=0.002, flush_at_exit=False
    )
    client._new_transport = lambda: ScriptedTransport(  # type: ignore[method-assign]
        [Retryable("busy", retry_after_s=0.0), Rejected("bad", index=1), None]
    )
    ids = [await client.feedback(f"g{i}", "copy", user_id="u") for i in range(3)]
    await client.flush(5)
    transport = client._transport
    assert transport.calls == [ids, ids, [ids[0], ids[2]]]
    assert (client.stats.sent, client.stats.failed, client.stats.retries) == (2, 1, 1)
    await client.close()


async def test_gives_up_after_max_attempts_and_bounds_its_buffer():
    client = AsyncFeedbackClient(
        url="http://x",
        api_key="k",
        max_attempts=3,
        backoff_initial_s=0.001,
        max_buffer_events=5,
        flush_at_exit=False,
    )
    client._new_transport = lambda: ScriptedTransport([Retryable("down")] * 10)  # type: ignore[method-assign]
    for i in range(8):
        await client.feedback(f"g{i}", "copy", user_id="u")
    await client.flush(5)
    assert (client.stats.sent, client.stats.failed, client.stats.dropped) == (0, 5, 3)
    await client.close()


# -- real delivery -----------------------------------------------------------------------
def test_sync_client_over_http(gateway_env: GatewayEnv):
    gen_id = f"gen-{uuid.uuid4().hex}"
    with FeedbackClient(url=gateway_env.url, api_key=gateway_env.keys["globex"], batch_max_events=50) as client:
        ids = [client.feedback(gen_id, "rating", 1 + i % 5, user_id="u") for i in range(120)]
        ids.append(client.generation(generation(gen_id)))
        client.flush(30)
        assert client.stats.sent == 121 and client.stats.failed == 0
    feedback = [
        e
        for e in read_events(gateway_env.bootstrap, f"{gateway_env.prefix}feedback.v1", FeedbackEvent)
        if e.generation_id == gen_id
    ]
    gens = [
        e
        for e in read_events(gateway_env.bootstrap, f"{gateway_env.prefix}generations.v1", GenerationEvent)
        if e.generation_id == gen_id
    ]
    assert sorted(e.event_id for e in feedback + gens) == sorted(ids)
    assert {e.tenant_id for e in feedback + gens} == {"globex"}


async def test_async_client_over_http_retry_is_not_doubled(gateway_env: GatewayEnv):
    gen_id = f"gen-{uuid.uuid4().hex}"
    async with AsyncFeedbackClient(url=gateway_env.url, api_key=gateway_env.keys["acme"]) as client:
        eid = await client.feedback(gen_id, "accept", user_id="u", event_id=f"fixed-{gen_id}")
        await client.flush(30)
        # The app retries the same signal (same event_id): the gateway answers it as a duplicate.
        await client.feedback(gen_id, "accept", user_id="u", event_id=eid)
        await client.flush(30)
        assert client.stats.sent == 2
    written = [
        e
        for e in read_events(gateway_env.bootstrap, f"{gateway_env.prefix}feedback.v1", FeedbackEvent)
        if e.generation_id == gen_id
    ]
    assert [e.event_id for e in written] == [eid]


async def test_async_client_straight_to_kafka(gateway_env: GatewayEnv):
    gen_id = f"gen-{uuid.uuid4().hex}"
    async with AsyncFeedbackClient(
        transport="kafka", bootstrap=gateway_env.bootstrap, topic_prefix=gateway_env.prefix, tenant="direct"
    ) as client:
        ids = [await client.feedback(gen_id, "dwell", 2.5 * i, user_id="u") for i in range(10)]
    written = [
        e
        for e in read_events(gateway_env.bootstrap, FEEDBACK.full_name(gateway_env.prefix), FeedbackEvent)
        if e.generation_id == gen_id
    ]
    assert sorted(e.event_id for e in written) == sorted(ids)
    assert {e.tenant_id for e in written} == {"direct"}


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_unclosed_client_flushes_at_exit(gateway_env: GatewayEnv, kind: str):
    gen_id = f"gen-{uuid.uuid4().hex}"
    body = {
        "sync": """
            client = FeedbackClient(url=URL, api_key=KEY, batch_linger_s=60)
            for i in range(25):
                client.feedback(GEN, "copy", user_id="u")
        """,
        "async": """
            client = AsyncFeedbackClient(url=URL, api_key=KEY, batch_linger_s=60)
            async def main():
                for i in range(25):
                    await client.feedback(GEN, "copy", user_id="u")
            asyncio.run(main())
        """,
    }[kind]
    script = "import asyncio\nfrom services.sdk import AsyncFeedbackClient, FeedbackClient\n"
    script += f"URL, KEY, GEN = {gateway_env.url!r}, {gateway_env.keys['acme']!r}, {gen_id!r}\n"
    script += textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    written = [
        e
        for e in read_events(gateway_env.bootstrap, f"{gateway_env.prefix}feedback.v1", FeedbackEvent)
        if e.generation_id == gen_id
    ]
    assert len(written) == 25


def test_sdk_import_is_light():
    code = "import sys, services.sdk; print(any(m in sys.modules for m in ('torch', 'transformers', 'fastapi')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
