"""The reward-model component in the stream: batched scoring off the hot path, the join
reading scores at settle time, and a model that is absent (fake scorers, no torch)."""

from __future__ import annotations

import dataclasses
import threading

import orjson

from schemas.codec import encode
from schemas.events import FeedbackEvent, GenerationEvent
from services.preferences.scoring import BackgroundScorer, ScoreMap
from streams.join import FB, GEN, JoinConfig, PartitionState, Record, process_batch
from streams.rewards import RewardParams


class FakeModel:
    """A ScoreFn that records its batch sizes; `gate` holds the first batch back."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.gate = threading.Event()

    def __call__(self, prompts: list[str], completions: list[str]) -> list[float]:
        self.gate.wait(5)
        self.batches.append(len(prompts))
        return [float(len(c)) for c in completions]


def test_scorer_scores_in_batches_and_never_blocks_submit() -> None:
    model = FakeModel()
    scorer = BackgroundScorer(lambda v: (3, model), batch_size=16, linger_s=0.05).start()
    try:
        for i in range(100):
            scorer.submit(f"g{i}", "p", "x" * i)  # returns at once while the model is held
        model.gate.set()
        assert scorer.drain(10)
        assert sum(model.batches) == 100 and max(model.batches) == 16
        assert len(model.batches) < 100 / 4  # batched, not one by one
        assert scorer.scores.get("g42") == 42.0 and scorer.version == 3
        assert scorer.status()["reward_model_scored"] == 100
    finally:
        scorer.stop()


def test_scorer_without_a_model_skips_counts_and_loads_it_later() -> None:
    published: list[int] = []

    def loader(version: int | None):
        if not published:
            raise FileNotFoundError("nothing published")
        model = FakeModel()
        model.gate.set()
        return published[-1], model

    scorer = BackgroundScorer(loader, batch_size=8, linger_s=0.01, retry_s=60).start()
    try:
        for i in range(10):
            scorer.submit(f"a{i}", "p", "abc")
        assert scorer.drain(10)
        st = scorer.status()
        assert st["reward_model_unavailable"] == 10 and st["reward_model_load_failures"] >= 1
        assert scorer.scores.get("a0") is None and st["reward_model_version"] is None
        published.append(5)
        scorer.want(5)  # what model-updates.v1 says; loaded between batches despite retry_s
        scorer.submit("b0", "p", "abcd")
        assert scorer.drain(10)
        assert scorer.scores.get("b0") == 4.0 and scorer.version == 5
    finally:
        scorer.stop()


def test_scorer_queue_full_drops_and_counts() -> None:
    model = FakeModel()  # gate never opened: the thread holds one batch
    scorer = BackgroundScorer(lambda v: (0, model), batch_size=1, queue_max=3, linger_s=0).start()
    try:
        for i in range(20):
            scorer.submit(f"g{i}", "p", "c")
        assert scorer.status()["reward_model_dropped"] >= 16
    finally:
        model.gate.set()
        scorer.stop()


def gen(gid: str, t: int, user: str = "u") -> GenerationEvent:
    return GenerationEvent(
        event_id=f"e-{gid}",
        event_time_ms=t,
        generation_id=gid,
        model="m",
        policy_version=1,
        prompt="p",
        completion="a b c",
        prompt_token_ids=[1],
        completion_token_ids=[2],
        completion_logprobs=[-0.5],
        user_id=user,
    )


def rec(event: GenerationEvent | FeedbackEvent, offset: int) -> Record:
    src = GEN if isinstance(event, GenerationEvent) else FB
    return Record(src, 0, offset, event.generation_id.encode(), encode(event))


def test_join_adds_the_score_when_ready_skips_and_counts_when_not() -> None:
    scores = ScoreMap(100)
    cfg = dataclasses.replace(
        JoinConfig(generation_ttl_ms=1000, weights={"reward_model": 0.5, "copy": 1.0, "thumb": 1.0}),
        model_scores=scores,
    )
    states = {0: PartitionState(0)}
    t = 1_000_000
    out = process_batch(states, [rec(gen("a", t), 0), rec(gen("b", t), 1), rec(gen("c", t), 2)], t, cfg)
    assert [g.generation_id for g in out.to_score] == ["a", "b", "c"]  # pending: handed out for scoring
    scores.put_many([("a", 0.8), ("c", -0.4)])
    copy = FeedbackEvent(event_id="f1", event_time_ms=t + 1, generation_id="a", kind="copy", user_id="u")
    thumb = FeedbackEvent(event_id="f2", event_time_ms=t + 1, generation_id="c", kind="thumb", value=1, user_id="u")
    out = process_batch(states, [rec(copy, 3), rec(thumb, 4)], t + 500, cfg)
    assert out.samples == []
    out = process_batch(states, [], t + 40_000, cfg)  # a, c settle by window; b expires (TTL)
    samples = {orjson.loads(v)["generation_id"]: orjson.loads(v) for _, _, v in out.samples}
    a = samples["a"]  # implicit feedback only: the score joins the reward
    assert a["reward_components"] == {"copy": 0.5, "reward_model": 0.8} and a["reward"] == 0.5 + 0.4
    assert "reward_model" not in samples["c"]["reward_components"]  # explicit thumb: not asked for
    assert "b" not in samples and out.counts["reward_model_skipped"] == 0 and out.counts["expired_dropped"] == 1
    # No feedback at all but a score: a TTL sample with the reward model's reward alone.
    scores.put_many([("d", 0.6)])
    process_batch(states, [rec(gen("d", t + 40_000), 5)], t + 40_000, cfg)
    out = process_batch(states, [], t + 50_000, cfg)
    (d,) = [orjson.loads(v) for _, _, v in out.samples]
    assert d["settle_reason"] == "ttl" and d["reward_components"] == {"reward_model": 0.6} and d["reward"] == 0.3
    # Score missing at settle time: the component is skipped and counted.
    process_batch(states, [rec(gen("e", t + 50_000), 6)], t + 50_000, cfg)
    acc = FeedbackEvent(event_id="f3", event_time_ms=t + 50_001, generation_id="e", kind="accept", user_id="u")
    out = process_batch(states, [rec(acc, 7)], t + 50_001, cfg)
    (e,) = [orjson.loads(v) for _, _, v in out.samples]
    assert "reward_model" not in e["reward_components"] and out.counts["reward_model_skipped"] == 1


def test_join_without_reward_model_is_unchanged() -> None:
    cfg = JoinConfig(params=RewardParams(), mine_preferences=True)
    states = {0: PartitionState(0)}
    t = 2_000_000
    edit = FeedbackEvent(
        event_id="f", event_time_ms=t + 1, generation_id="a", kind="edit", edited_text="x y z", final=True, user_id="u"
    )
    out = process_batch(states, [rec(gen("a", t), 0), rec(edit, 1)], t + 1, cfg)
    assert out.to_score == [] and len(out.samples) == 1
    ((p, outcome),) = out.outcomes
    assert p == 0 and outcome.generation_id == "a" and outcome.feedback[0].edited_text == "x y z"
