"""The trainer in-process on the real broker: steps, drops, checkpoints, publishing."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
import torch

from schemas.codec import decode
from schemas.events import ModelUpdateEvent
from schemas.topics import DLQ, MODEL_UPDATES, SAMPLES
from services.checkpoints import delta
from services.checkpoints.store import CheckpointStore
from services.trainer import policy, state
from services.trainer.settings import TrainerSettings
from tests.trainer_helpers import MODEL, end_offsets, make_samples, produce, read_all

LOOSE_GATE = {
    "gate_min_heldout": 1,
    "gate_max_truncated_frac": 1.0,
    "gate_min_distinct2": 0.0,
    "gate_min_length_ratio": 0.0,
    "gate_kl_parent_max": 1e9,
    "gate_reward_drop_max": 1e9,
    "gate_prompts": 4,
    "gate_max_new_tokens": 8,
}


def trainer_settings(tmp_path: Path, tiny_model_dir: Path, topic_prefix: str, **kw: object) -> TrainerSettings:
    base = {
        "home_dir": tmp_path / "home",
        "topic_prefix": topic_prefix,
        "model_name": MODEL,
        "model_dir": tiny_model_dir,
        "trainer_batch_size": 4,
        "trainer_micro_batch_size": 4,
        "trainer_batch_wait_s": 0.5,
        "checkpoint_every_steps": 3,
        "publish_every_s": 0,
        "heldout_every": 4,
        "lr": 1e-3,
        **LOOSE_GATE,
    }
    base.update(kw)
    return TrainerSettings(_env_file=None, **base)


def test_trainer_trains_checkpoints_and_publishes(tmp_path, tiny_model_dir, kafka_bootstrap, topic_prefix) -> None:
    from services.trainer.loop import Trainer

    topic = SAMPLES.full_name(topic_prefix)
    samples = make_samples(40)
    produce(kafka_bootstrap, topic, samples)
    produce(kafka_bootstrap, topic, [b"{not json"])
    other = make_samples(1, seed=9)[0].model_copy(update={"model": "another"})
    produce(kafka_bootstrap, topic, [other])
    s = trainer_settings(tmp_path, tiny_model_dir, topic_prefix, publish_every_steps=4, full_snapshot_every_versions=2)
    trainer = Trainer(s, kafka_bootstrap)
    before = policy.copy_weights(trainer.model)
    stats = trainer.run(idle_exit_s=2.0)

    m = trainer.meta
    assert m.offsets == {p: o for p, o in end_offsets(kafka_bootstrap, topic, SAMPLES.partitions).items() if o}
    assert stats["samples"] + m.counters.get("heldout", 0) == 40
    assert m.counters["invalid"] == 1 and m.counters["other_model"] == 1
    assert m.optimizer_steps >= 1 and m.samples_trained > 0
    after = policy.weights(trainer.model)
    assert any(not torch.equal(before[k], after[k]) for k in before)

    # The checkpoint on disk holds the same offsets and weights.
    meta, weights, _ = state.load(state.latest(trainer.state_dir))
    assert meta.offsets == m.offsets and meta.step == m.step
    assert delta.weights_sha256(weights) == delta.weights_sha256(after)

    # Dead letter for the junk message.
    dlq = read_all(kafka_bootstrap, DLQ.full_name(topic_prefix), expect=1)
    assert len(dlq) == 1 and orjson.loads(dlq[0])["rejected_by"] == "trainer"

    # Version 0 (full, ungated) then gated versions; replicas rebuild them bit-exactly.
    raw = read_all(kafka_bootstrap, MODEL_UPDATES.full_name(topic_prefix), expect=1 + m.counters.get("published", 0))
    events = [decode(ModelUpdateEvent, r) for r in raw]
    assert [e.version for e in events] == list(range(len(events)))
    assert len(events) >= 2, m.counters
    store = CheckpointStore(s.checkpoint_dir)
    assert events[0].artifact_kind == "full" and events[1].artifact_kind == "delta"
    assert "reward_estimate" in events[1].eval_metrics
    latest = events[-1]
    got = store.materialize(MODEL, latest.version)
    assert delta.weights_sha256(got) == latest.weights_sha256
    assert delta.weights_sha256(store.materialize(MODEL, 0)) == delta.weights_sha256(before)


def test_rollback_republishes_an_earlier_version(tmp_path, tiny_model_dir, kafka_bootstrap, topic_prefix) -> None:
    from services.trainer.loop import rollback_event

    s = trainer_settings(tmp_path, tiny_model_dir, topic_prefix)
    store = CheckpointStore(s.checkpoint_dir)
    w = {"a": torch.zeros(3)}
    store.publish(MODEL, 0, w, parent_version=None, full=True)
    store.publish(MODEL, 1, {"a": torch.ones(3)}, parent_version=0, full=False, eval_metrics={"x": 1.0})
    ev = rollback_event(store, MODEL, 0)
    assert ev.rollback and ev.version == 0 and ev.event_id != store.manifest(MODEL, 0).event_id
    with pytest.raises(Exception, match="not in the store"):
        rollback_event(store, MODEL, 7)


@pytest.mark.parametrize("background", [True, False])
def test_optimiser_keeps_stepping_while_a_version_is_published(
    background: bool, tmp_path, tiny_model_dir, kafka_bootstrap, topic_prefix, monkeypatch
) -> None:
    """In the background the gate and the store get a copy of the weights while the
    optimiser takes further steps, and the version holds the weights of the step that made
    it due; inline, no step runs until the publish is done."""
    from services.trainer.loop import Trainer

    produce(kafka_bootstrap, SAMPLES.full_name(topic_prefix), make_samples(48))
    s = trainer_settings(
        tmp_path,
        tiny_model_dir,
        topic_prefix,
        publish_every_steps=2,
        publish_in_background=background,
        checkpoint_every_steps=1000,
        trainer_batch_wait_s=0.2,
    )
    trainer = Trainer(s, kafka_bootstrap)
    seen: list[tuple[int, int, str]] = []  # per publish: its step, the step count at its end, its weights
    weights_at: dict[int, str] = {}  # step -> the trainer's weights right after it
    real_publish, real_step = trainer._gate_and_publish, trainer.step

    def slow_publish(job):
        deadline = time.monotonic() + (60 if background else 1.0)
        while trainer.stats["steps"] < job.step + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        out = real_publish(job)
        seen.append((job.step, trainer.stats["steps"], delta.weights_sha256(job.weights)))
        return out

    def step(batch):
        figures = real_step(batch)
        weights_at[trainer.meta.step] = delta.weights_sha256(policy.weights(trainer.model))
        return figures

    monkeypatch.setattr(trainer, "_gate_and_publish", slow_publish)
    monkeypatch.setattr(trainer, "step", step)
    trainer.run(idle_exit_s=2.0)

    assert seen, "no publish was attempted"
    job_step, steps_at_end, published = seen[0]
    if background:
        assert steps_at_end >= job_step + 2, seen  # two steps ran while it was published
    else:
        assert steps_at_end == job_step, seen  # nothing ran meanwhile
    # The first version holds exactly the weights of the step that made it due.
    v1 = trainer.store.manifest(MODEL, 1)
    assert v1.weights_sha256 == published == weights_at[job_step]
    assert trainer.meta.published_version == max(trainer.store.versions(MODEL))
