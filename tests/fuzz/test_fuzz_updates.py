"""Hostile model-update events against a serving replica's follower (services/serving/updates.py)
on the real broker: raw garbage, forged events for other models, and a handler that
fails. The follower skips and counts what it cannot decode, keeps following, and hands
the replica every valid event for its model; a forged event whose artifact does not
exist only reaches the replica's store, which refuses it (tests/fuzz/test_fuzz_checkpoints.py)."""

from __future__ import annotations

import threading
import time

import orjson
import pytest
from confluent_kafka import Producer

from schemas.codec import encode
from schemas.events import ArtifactKind, ModelUpdateEvent
from schemas.topics import MODEL_UPDATES
from services.serving.updates import UpdateFollower
from tests.fuzz.corpus_files import corpus

pytestmark = pytest.mark.timeout(120)
MODEL = "chaos-policy"


def _update(version: int, model: str = MODEL, **over: object) -> ModelUpdateEvent:
    fields = {
        "model": model,
        "version": version,
        "artifact_kind": ArtifactKind.FULL,
        "artifact_url": f"{model}/{version:010d}.safetensors",
        "sha256": "a" * 64,
        "size_bytes": 10,
    } | over
    return ModelUpdateEvent(**fields)


def _produce(bootstrap: str, topic: str, values: list[tuple[bytes | None, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for key, value in values:
        producer.produce(topic, value, key)
    assert producer.flush(30) == 0


def _wait(cond, what: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_follower_survives_garbage_and_forgeries(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = MODEL_UPDATES.full_name(topic_prefix)
    got: list[ModelUpdateEvent] = []
    follower = UpdateFollower(
        kafka_bootstrap, topic_prefix=topic_prefix, model=MODEL, replica_id="fz", on_update=got.append
    )
    _produce(kafka_bootstrap, topic, [(MODEL.encode(), encode(_update(0)))])
    follower.start()
    try:
        _wait(lambda: follower.caught_up.is_set() and len(got) == 1, "catch-up")
        garbage = [(MODEL.encode(), raw) for _, raw in corpus()]
        forged = [
            (b"other", encode(_update(5, model="other-model"))),  # another model's version: not ours
            (MODEL.encode(), orjson.dumps({**orjson.loads(encode(_update(6))), "artifact_url": 7})),
            (MODEL.encode(), orjson.dumps({**orjson.loads(encode(_update(6))), "version": -1})),
            (MODEL.encode(), orjson.dumps({**orjson.loads(encode(_update(6))), "sha256": "../../x"})),
            (MODEL.encode(), orjson.dumps({**orjson.loads(encode(_update(6))), "artifact_kind": "delta"})),
        ]
        # A well-formed event naming a path outside the store is handed over: the replica
        # loads by (model, version) from the store's own manifest and refuses it there.
        traversal = (MODEL.encode(), encode(_update(7, artifact_url="../../etc/passwd")))
        _produce(kafka_bootstrap, topic, [*garbage, *forged, traversal, (MODEL.encode(), encode(_update(8)))])
        _wait(lambda: [e.version for e in got] == [0, 7, 8], "the valid events after the garbage")
        assert follower.invalid_events == len(garbage) + len(forged) - 1  # the other model's event is valid
        assert follower._thread.is_alive()
    finally:
        follower.stop()


def test_follower_survives_a_failing_handler(kafka_bootstrap: str, topic_prefix: str) -> None:
    topic = MODEL_UPDATES.full_name(topic_prefix)
    seen: list[int] = []
    failed = threading.Event()

    def on_update(ev: ModelUpdateEvent) -> None:
        seen.append(ev.version)
        if ev.version == 1:
            failed.set()
            raise RuntimeError("the replica could not load this version")

    follower = UpdateFollower(
        kafka_bootstrap, topic_prefix=topic_prefix, model=MODEL, replica_id="fz", on_update=on_update
    )
    follower.start()
    try:
        _wait(follower.caught_up.is_set, "catch-up")
        _produce(kafka_bootstrap, topic, [(MODEL.encode(), encode(_update(1)))])
        _wait(failed.is_set, "the failing handler")
        _produce(kafka_bootstrap, topic, [(MODEL.encode(), encode(_update(2)))])
        _wait(lambda: seen == [1, 2], "the next event after a handler failure", 30)
        assert follower._thread.is_alive() and follower.handler_failures == 1
    finally:
        follower.stop()
