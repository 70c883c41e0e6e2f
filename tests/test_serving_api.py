"""The replica's OpenAI API through the official `openai` client, against a real server
(in-process uvicorn on loopback), the tiny model and the real broker."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from schemas.events import GenerationEvent, ReplicaStatusEvent
from schemas.topics import GENERATIONS, REPLICA_STATUS
from tests.test_serving_support import consume, wait_for

MODEL = "tiny-policy"


@pytest.fixture(scope="module")
def module_prefix(kafka_bootstrap: str) -> str:
    from services.kafka.topics import ensure_topics

    prefix = f"t{uuid.uuid4().hex[:10]}."
    ensure_topics(kafka_bootstrap, prefix)
    return prefix


@pytest.fixture(scope="module")
def server(kafka_bootstrap: str, module_prefix: str, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from services.serving.server import ServerThread
    from services.serving.settings import ServingSettings

    settings = ServingSettings(
        kafka_url=f"kafka://{kafka_bootstrap}",
        topic_prefix=module_prefix,
        model_dir=tiny_model_dir,
        model_name=MODEL,
        serving_port=0,
        home_dir=tmp_path_factory.mktemp("home"),
        replica_id="api-test",
        max_batch_size=8,
        batch_wait_ms=20,
        default_max_tokens=8,
    )
    with ServerThread(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
        user="user-1",
    )
    extra = r.model_extra or {}
    assert extra["generation_id"].startswith("gen-") and extra["policy_version"] == 0
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == len(r.choices[0].logprobs.content) <= 6
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in r.choices[0].logprobs.content)
    assert r.model_dump()["generation_id"] == extra["generation_id"]


def test_chat_stream_carries_generation_id_in_every_chunk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    ids = {c.model_extra["generation_id"] for c in chunks}
    assert len(ids) == 1 and len(chunks) >= 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    assert all(c.model_extra["policy_version"] == 0 for c in chunks)


def test_completions_and_stream(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, logprobs=1, seed=7)
    assert r.model_extra["generation_id"].startswith("gen-")
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, logprobs=1, seed=7)
    assert again.choices[0].text == r.choices[0].text  # a seed reproduces the sample
    chunks = list(client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=4, stream=True))
    assert chunks and all("generation_id" in c.model_extra for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_errors_are_openai_shaped(client: openai.OpenAI, server) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=9)
    assert exc.value.param == "temperature" and exc.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=10**6)
    assert exc.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    assert exc.value.param == "model" and exc.value.code == "model_not_found"
    r = httpx.post(f"{server.base_url}/chat/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(
        f"{server.base_url}/chat/completions", json={"model": MODEL, "messages": [{"role": "x"}]}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"


def test_concurrent_requests_are_batched(client: openai.OpenAI, server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> str:
        return client.completions.create(model=MODEL, prompt=f"number {i}", max_tokens=4).model_extra["generation_id"]

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, range(8)))
    assert len(set(ids)) == 8
    text = httpx.get(server.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    assert "rlfeed_serving_batch_size_bucket" in text and "rlfeed_serving_requests_total" in text
    sizes = [line for line in text.splitlines() if line.startswith("rlfeed_serving_batch_size_count")]
    count = float(sizes[0].split()[-1])
    assert count < server.replica.requests_total  # some batch held more than one request


def test_generation_events_reach_kafka(client: openai.OpenAI, server, kafka_bootstrap: str, module_prefix: str) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "event please"}],
        max_tokens=5,
        user="alice@example.com",
        extra_headers={"x-rlfeed-session": "sess-1"},
    )
    gid = r.model_extra["generation_id"]
    events = consume(
        kafka_bootstrap,
        GENERATIONS.full_name(module_prefix),
        GenerationEvent,
        lambda evs: any(e.generation_id == gid for e in evs),
    )
    ev = next(e for e in events if e.generation_id == gid)
    assert ev.model == MODEL and ev.policy_version == 0 and ev.replica_id == "api-test"
    assert ev.completion == r.choices[0].message.content
    assert len(ev.completion_token_ids) == len(ev.completion_logprobs) == r.usage.completion_tokens
    assert len(ev.prompt_token_ids) == r.usage.prompt_tokens and "event please" in ev.prompt
    assert ev.user_id.startswith("h-") and "alice" not in ev.user_id  # pseudonymous
    assert ev.session_id == "sess-1" and ev.sampling.max_tokens == 5 and ev.latency_ms is not None
    statuses = consume(
        kafka_bootstrap,
        REPLICA_STATUS.full_name(module_prefix),
        ReplicaStatusEvent,
        lambda evs: any(e.replica_id == "api-test" for e in evs),
    )
    assert any(s.state == "serving" and s.version == 0 for s in statuses)
    health = httpx.get(server.base_url.removesuffix("/v1") + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["events"]["dropped"] == {}


def test_an_event_lost_to_a_bug_is_counted_and_reported(
    client: openai.OpenAI, server, kafka_bootstrap: str, module_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bookkeeping after a response never raises into the void: an exception before the
    generation event is handed over is logged, counted as a lost event (reason `error`),
    shown on /metrics and reported on replica-status.v1 (the dashboard's alert reads it)."""
    replica = server.replica

    def broken(ev: GenerationEvent) -> None:
        raise KeyError(ev.policy_version)

    monkeypatch.setattr(replica, "emit_generation", broken)
    r = client.completions.create(model=MODEL, prompt="lost event", max_tokens=3)
    assert r.choices[0].text is not None  # the user got the answer
    wait_for(lambda: replica.sink.dropped_by_reason().get("error") == 1, 30, "the lost event to be counted")
    metrics = httpx.get(server.base_url.removesuffix("/v1") + "/metrics", timeout=30).text
    assert 'rlfeed_serving_events_dropped{reason="error"} 1.0' in metrics
    replica.report()
    statuses = consume(
        kafka_bootstrap,
        REPLICA_STATUS.full_name(module_prefix),
        ReplicaStatusEvent,
        lambda evs: any(e.events_dropped.get("error") == 1 for e in evs),
    )
    assert any(e.replica_id == "api-test" and e.events_dropped == {"error": 1} for e in statuses)
