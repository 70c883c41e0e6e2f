"""Generation events while the broker is down: bounded buffer, counted drops, recovery."""

from __future__ import annotations

import uuid
from pathlib import Path

import httpx
import openai

from schemas.events import GenerationEvent
from schemas.topics import GENERATIONS
from services.kafka.embedded import EmbeddedBroker, free_port
from services.kafka.topics import ensure_topics
from services.serving.events import EventSink, generation_event
from tests.test_serving_support import consume, wait_for


def _event(i: int) -> GenerationEvent:
    return generation_event(
        generation_id=f"gen-{i}",
        model="m",
        policy_version=0,
        prompt="p",
        completion="c",
        prompt_token_ids=[1, 2],
        completion_token_ids=[3],
        completion_logprobs=[-0.5],
        temperature=1.0,
        top_p=1.0,
        max_tokens=4,
        seed=None,
        finish_reason="length",
        user_id="u",
        session_id=None,
        replica_id="r",
        latency_ms=1.0,
    )


def test_no_broker_counts_drops() -> None:
    sink = EventSink(None)
    assert not sink.emit(GENERATIONS, _event(1))
    assert sink.dropped == {"no_broker": 1}
    sink.close()


def test_buffer_is_bounded_and_delivers_after_the_broker_comes_up(tmp_path: Path) -> None:
    port = free_port()
    prefix = f"t{uuid.uuid4().hex[:10]}."
    sink = EventSink(f"127.0.0.1:{port}", topic_prefix=prefix, buffer_max=5, delivery_timeout_s=120)
    try:
        results = [sink.emit(GENERATIONS, _event(i)) for i in range(8)]
        assert results == [True] * 5 + [False] * 3
        assert sink.dropped == {"buffer_full": 3} and sink.emitted == 5
        with EmbeddedBroker(tmp_path / "late-broker", port=port) as broker:
            ensure_topics(broker.bootstrap, prefix)
            assert sink.flush(60) == 0
            assert sink.delivered == 5
            got = consume(broker.bootstrap, GENERATIONS.full_name(prefix), GenerationEvent, lambda e: len(e) >= 5)
            assert sorted(e.generation_id for e in got) == [f"gen-{i}" for i in range(5)]
            sink.close()
    finally:
        sink.close(0.1)


def test_replica_answers_while_the_broker_is_down_then_recovers(tmp_path: Path, tiny_model_dir: Path) -> None:
    from services.serving.server import ServerThread
    from services.serving.settings import ServingSettings

    port = free_port()
    prefix = f"t{uuid.uuid4().hex[:10]}."
    settings = ServingSettings(
        kafka_url=f"kafka://127.0.0.1:{port}",
        topic_prefix=prefix,
        model_dir=tiny_model_dir,
        model_name="m",
        serving_port=0,
        home_dir=tmp_path / "home",
        replica_id="offline-test",
        follow_updates=False,
        batch_wait_ms=1,
    )
    with ServerThread(settings) as srv, openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as client:
        ids = [
            client.completions.create(model="m", prompt=f"p{i}", max_tokens=3).model_extra["generation_id"]
            for i in range(3)
        ]
        health = httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=30).json()
        assert health["events"]["delivered"] == 0 and health["events"]["buffered"] >= 3
        with EmbeddedBroker(tmp_path / "broker", port=port) as broker:
            ensure_topics(broker.bootstrap, prefix)
            got = consume(
                broker.bootstrap,
                GENERATIONS.full_name(prefix),
                GenerationEvent,
                lambda evs: {e.generation_id for e in evs} >= set(ids),
                timeout_s=60,
            )
            assert {e.generation_id for e in got} >= set(ids)
            wait_for(lambda: srv.replica.sink.buffered == 0, 30, "the buffer to drain")
            assert srv.replica.sink.dropped_total == 0
            srv.stop()
