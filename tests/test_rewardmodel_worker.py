"""Integration: a real `rlfeed streams` worker on the real broker mines preferences onto
preferences.v1 and keeps joining when reward-model scoring is on but no model exists."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest

from schemas.events import FeedbackEvent, GenerationEvent, now_ms
from schemas.topics import JOIN_PARTITIONS, PREFERENCES, SAMPLES
from tests.test_streams_worker import SCENARIO_ENV, Reader, Worker, produce

pytestmark = pytest.mark.timeout(120)


def gen(gid: str, completion: str, t: int) -> GenerationEvent:
    return GenerationEvent(
        event_id=f"e-{gid}",
        event_time_ms=t,
        generation_id=gid,
        model="m",
        policy_version=1,
        prompt="Suggest a name for a cat.",
        completion=completion,
        prompt_token_ids=[1, 2],
        completion_token_ids=[3],
        completion_logprobs=[-0.5],
        user_id="u1",
    )


def fb(gid: str, kind: str, t: int, **kw: object) -> FeedbackEvent:
    return FeedbackEvent(event_id=f"f-{gid}-{kind}", event_time_ms=t, generation_id=gid, kind=kind, user_id="u1", **kw)


def test_worker_mines_preferences_and_survives_an_absent_reward_model(
    kafka_bootstrap: str, topic_prefix: str, tmp_path: Path
) -> None:
    worker = Worker(
        kafka_bootstrap,
        topic_prefix,
        f"g-{uuid.uuid4().hex[:8]}",
        tmp_path / "w.log",
        **SCENARIO_ENV,
        RLFEED_REWARD_MODEL_ENABLED="true",
        RLFEED_CHECKPOINT_DIR=str(tmp_path / "empty-store"),
        RLFEED_STATUS_INTERVAL_S="1",
    )
    reader = Reader(
        kafka_bootstrap,
        {SAMPLES.full_name(topic_prefix): JOIN_PARTITIONS, PREFERENCES.full_name(topic_prefix): JOIN_PARTITIONS},
    )
    try:
        worker.wait_log("streams.assigned", lambda r: len(r["partitions"]) == JOIN_PARTITIONS)
        t = now_ms()
        events = [
            gen("a", "Whiskers, Luna, Oliver, Milo, Bella, Simba, and a long list of other names.", t),
            fb("a", "regenerate", t + 1),
            gen("b", "Whiskers.", t + 2),
            fb("b", "accept", t + 3),
            gen("c", "Luna", t + 4),
            fb("c", "edit", t + 5, edited_text="Luna the brave", final=True),
        ]
        produce(kafka_bootstrap, topic_prefix, events)
        prefs_topic = PREFERENCES.full_name(topic_prefix)

        def prefs() -> dict[str, dict]:
            out = {}
            for m in reader.messages[prefs_topic]:
                p = orjson.loads(m.value())
                out[p["kind"]] = p
            return out

        reader.wait(lambda: {"regenerate_accept", "edit"} <= set(prefs()), what="mined preferences")
        reader.wait(lambda: len(reader.messages[SAMPLES.full_name(topic_prefix)]) >= 3, what="3 samples")
        got = prefs()
        assert (
            got["regenerate_accept"]["chosen"] == "Whiskers."
            and got["regenerate_accept"]["rejected_generation_id"] == "a"
        )
        assert got["edit"]["chosen"] == "Luna the brave" and got["edit"]["rejected"] == "Luna"
        status = worker.wait_log("streams.status", lambda r: r["join"].get("reward_model_load_failures", 0) >= 1)
        join = status["join"]
        assert join["reward_model_version"] is None and join["samples"] >= 3
        assert join["reward_model_skipped"] >= 1  # a and b had implicit feedback only, and no score
        assert join["preferences"] >= 2
    finally:
        reader.close()
        worker.stop()
