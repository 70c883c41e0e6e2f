"""A running trainer follows rollbacks (operators' and canary rollouts')."""

from __future__ import annotations

import threading
import time

import torch

from schemas.codec import encode, key_of
from schemas.events import ModelUpdateEvent, RolloutEvent
from schemas.topics import MODEL_UPDATES, ROLLOUTS, SAMPLES
from services.checkpoints import delta
from services.trainer import lineage, policy
from services.trainer.settings import TrainerSettings
from tests.trainer_helpers import MODEL, make_samples, produce


def _update(version: int, *, rollback: bool = False, t: int = 1000, model: str = MODEL) -> ModelUpdateEvent:
    return ModelUpdateEvent(
        model=model,
        version=version,
        parent_version=None,
        artifact_kind="full",
        artifact_url=f"{model}/{version}",
        sha256="0" * 64,
        size_bytes=1,
        rollback=rollback,
        event_time_ms=t,
    )


def _rollout(stable: int, dropped: int, decision: str = "rollback", t: int = 1000) -> RolloutEvent:
    return RolloutEvent(
        model=MODEL,
        stable_version=stable,
        decision=decision,
        arms={"rollout.decided_version": float(dropped)},
        event_time_ms=t,
    )


def test_rollback_target() -> None:
    chain = [5, 4, 3]  # the trainer builds on 5, a child of 4, a child of 3
    # an operator's rollback, newer than the lineage: reload it
    assert lineage.rollback_target(_update(2, rollback=True, t=2000), MODEL, chain, 1500) == 2
    assert lineage.rollback_target(_update(4, rollback=True, t=2000), MODEL, chain, 1500) == 4
    # already building on it, older than the lineage, not a rollback, another model: nothing
    assert lineage.rollback_target(_update(5, rollback=True, t=2000), MODEL, chain, 1500) is None
    assert lineage.rollback_target(_update(2, rollback=True, t=1500), MODEL, chain, 1500) is None
    assert lineage.rollback_target(_update(2, t=2000), MODEL, chain, 1500) is None
    assert lineage.rollback_target(_update(2, rollback=True, t=2000, model="other"), MODEL, chain, 1500) is None
    # a canary rollout dropped the parent or an ancestor: reload the stable version
    assert lineage.rollback_target(_rollout(2, dropped=5, t=2000), MODEL, chain, 1500) == 2
    assert lineage.rollback_target(_rollout(2, dropped=3, t=2000), MODEL, chain, 1500) == 2
    # it dropped a version off the lineage, or promoted, or is history: nothing
    assert lineage.rollback_target(_rollout(2, dropped=6, t=2000), MODEL, chain, 1500) is None
    assert lineage.rollback_target(_rollout(5, dropped=5, decision="promote", t=2000), MODEL, chain, 1500) is None
    assert lineage.rollback_target(_rollout(2, dropped=5, t=1000), MODEL, chain, 1500) is None
    assert lineage.rollback_target(_rollout(5, dropped=6, t=2000), MODEL, chain, 1500) is None


def test_ancestry_walks_parents_and_stops_at_cycles() -> None:
    parents = {5: 4, 4: 2, 2: 0, 0: None}
    assert lineage.ancestry(5, parents.get) == [5, 4, 2, 0]
    assert lineage.ancestry(7, parents.get) == [7]
    assert lineage.ancestry(1, {1: 2, 2: 1}.get) == [1, 2]


def _wait(cond, what: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def _sha(model: torch.nn.Module) -> str:
    return delta.weights_sha256(policy.copy_weights(model))


def _settings(tmp_path, tiny_model_dir, topic_prefix: str) -> TrainerSettings:
    """A trainer that publishes every 2 steps of 4 samples, ungated."""
    return TrainerSettings(
        _env_file=None,
        home_dir=tmp_path / "home",
        topic_prefix=topic_prefix,
        model_name=MODEL,
        model_dir=tiny_model_dir,
        trainer_batch_size=4,
        trainer_micro_batch_size=4,
        trainer_batch_wait_s=0.3,
        heldout_every=10**9,
        publish_every_steps=2,
        publish_every_s=0,
        gate_enabled=False,
        lr=1e-2,
    )


def test_running_trainer_follows_rollbacks(tmp_path, tiny_model_dir, kafka_bootstrap, topic_prefix) -> None:
    """`rlfeed rollback` and a rollout's rollback, through the real broker: the trainer
    reloads the served version and publishes its children; a restart keeps following."""
    from confluent_kafka import Producer

    from services.kafka.producers import producer_config
    from services.trainer.loop import Trainer, rollback_event

    s = _settings(tmp_path, tiny_model_dir, topic_prefix)
    samples_topic = SAMPLES.full_name(topic_prefix)
    producer = Producer(producer_config(kafka_bootstrap))

    def send(topic: str, ev, key: str) -> None:
        producer.produce(topic, encode(ev), key=key_of(ev, key))
        assert producer.flush(30) == 0

    trainer = Trainer(s, kafka_bootstrap)
    store = trainer.store
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    try:
        produce(kafka_bootstrap, samples_topic, make_samples(8, seed=1))
        _wait(lambda: store.latest_version(MODEL) == 1, "version 1")
        produce(kafka_bootstrap, samples_topic, make_samples(8, seed=2))
        _wait(lambda: store.latest_version(MODEL) == 2, "version 2")
        assert store.manifest(MODEL, 2).parent_version == 1

        # 1. an operator rolls back to version 1: the trainer reloads it, fresh optimiser
        send(MODEL_UPDATES.full_name(topic_prefix), rollback_event(store, MODEL, 1), MODEL_UPDATES.key)
        _wait(lambda: trainer.meta.counters.get("rollbacks_followed") == 1, "the rollback to 1")
        assert trainer.meta.published_version == 1 and not trainer.optimizer.state
        v1 = store.materialize(MODEL, 1)
        assert _sha(trainer.model) == delta.weights_sha256(v1)

        # ... and its next version is a child of 1, numbered after every earlier one
        produce(kafka_bootstrap, samples_topic, make_samples(8, seed=3))
        _wait(lambda: store.latest_version(MODEL) == 3, "version 3")
        assert store.manifest(MODEL, 3).parent_version == 1

        # 2. a canary rollout drops version 3 and keeps 1 stable: back to 1 again
        send(ROLLOUTS.full_name(topic_prefix), _rollout(1, dropped=3, t=int(time.time() * 1000)), ROLLOUTS.key)
        _wait(lambda: trainer.meta.counters.get("rollbacks_followed") == 2, "the rollout's rollback")
        assert trainer.meta.published_version == 1 and _sha(trainer.model) == delta.weights_sha256(v1)

        # a rollout that drops a version the trainer does not build on changes nothing
        send(ROLLOUTS.full_name(topic_prefix), _rollout(0, dropped=2, t=int(time.time() * 1000)), ROLLOUTS.key)
        produce(kafka_bootstrap, samples_topic, make_samples(8, seed=4))
        _wait(lambda: store.latest_version(MODEL) == 4, "version 4")
        assert store.manifest(MODEL, 4).parent_version == 1
        assert trainer.meta.counters.get("rollbacks_followed") == 2
    finally:
        trainer.stop.set()
        thread.join(60)
    assert not thread.is_alive()

    # 3. a rollback while no trainer runs is followed at the next start; a restart after
    # it (the checkpoint remembers when the lineage was adopted) does not follow it again
    send(MODEL_UPDATES.full_name(topic_prefix), rollback_event(store, MODEL, 2), MODEL_UPDATES.key)
    again = Trainer(s, kafka_bootstrap)
    try:
        assert again.meta.published_version == 2
        assert _sha(again.model) == delta.weights_sha256(store.materialize(MODEL, 2))
    finally:
        again.run(max_steps=0, idle_exit_s=0.0)
    third = Trainer(s, kafka_bootstrap)
    try:
        assert third.meta.published_version == 2 and third.stats["rollbacks_followed"] == 0
    finally:
        third.run(max_steps=0, idle_exit_s=0.0)


def test_a_rollback_during_a_publish_supersedes_it(tmp_path, tiny_model_dir, kafka_bootstrap, topic_prefix) -> None:
    """The race a background publish opens: an operator rolls back to 1 while the trainer
    gates version 3 (a child of 2), and 3 lands after the rollback. Replicas follow the
    topic's latest event, so 3 would undo the rollback; the trainer publishes the rollback
    to 1 again after it, and builds on 1."""
    from confluent_kafka import Producer

    from services.kafka.producers import producer_config
    from services.trainer.loop import Trainer, rollback_event
    from tests.test_serving_support import consume

    s = _settings(tmp_path, tiny_model_dir, topic_prefix)
    samples_topic = SAMPLES.full_name(topic_prefix)
    updates_topic = MODEL_UPDATES.full_name(topic_prefix)
    trainer = Trainer(s, kafka_bootstrap)
    store = trainer.store
    publish = trainer._gate_and_publish
    gating, go = threading.Event(), threading.Event()

    def slow_gate(job):  # the publisher thread holds version 3 until the rollback is out
        if job.parent_version == 2:
            gating.set()
            assert go.wait(60)
        return publish(job)

    trainer._gate_and_publish = slow_gate
    thread = threading.Thread(target=trainer.run, daemon=True)
    thread.start()
    try:
        for seed, version in ((1, 1), (2, 2)):
            produce(kafka_bootstrap, samples_topic, make_samples(8, seed=seed))
            _wait(lambda v=version: store.latest_version(MODEL) == v, f"version {version}")
        produce(kafka_bootstrap, samples_topic, make_samples(8, seed=3))
        _wait(gating.is_set, "the publish of version 3 to start")
        producer = Producer(producer_config(kafka_bootstrap))
        rollback = rollback_event(store, MODEL, 1)
        producer.produce(updates_topic, encode(rollback), key=key_of(rollback, MODEL_UPDATES.key))
        assert producer.flush(30) == 0
        time.sleep(0.05)  # version 3's event time comes after the rollback's
        go.set()
        _wait(lambda: trainer.meta.counters.get("rollbacks_followed") == 1, "the rollback to 1")
        assert store.latest_version(MODEL) == 3 and store.manifest(MODEL, 3).parent_version == 2
        assert trainer.meta.counters.get("publishes_superseded") == 1
        assert trainer.meta.published_version == 1
        assert _sha(trainer.model) == delta.weights_sha256(store.materialize(MODEL, 1))
        events = consume(
            kafka_bootstrap, updates_topic, ModelUpdateEvent, lambda evs: len(evs) >= 5 and evs[-1].version == 1
        )
        # 1, 2, the operator's rollback to 1, 3 (landed after it), the rollback to 1 again
        assert [(e.version, e.rollback) for e in events[1:]] == [
            (1, False),
            (2, False),
            (1, True),
            (3, False),
            (1, True),
        ]
    finally:
        go.set()
        trainer.stop.set()
        thread.join(60)
    assert not thread.is_alive()
