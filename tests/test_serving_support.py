"""Shared helpers of the serving tests (no tests here; named test_* to live with them)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from schemas.codec import decode
from schemas.events import Event
from services.serving.engines.base import Engine, Job

E = TypeVar("E", bound=Event)


def consume(
    bootstrap: str, topic: str, model: type[E], until: Callable[[list[E]], bool], timeout_s: float = 30.0
) -> list[E]:
    """Read `topic` from the beginning until `until(events)` holds or the time is up."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        events: list[E] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not until(events):
            for msg in consumer.consume(100, timeout=0.5):
                if msg.error() is None:
                    events.append(decode(model, msg.value()))
        return events
    finally:
        consumer.close()


def wait_for(cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll `cond` until true; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


class FakeEngine(Engine):
    """The real scheduler around a batch that finishes every job at once and records when
    it started; weights are recorded, never checked. Subclasses change what they need."""

    name = "transformers"  # a name replica-status.v1 accepts
    tokenizer = None  # type: ignore[assignment]
    max_model_len = 64  # type: ignore[assignment]

    def __init__(self, max_batch_size: int = 4, arm_switch_hold_ms: float = 0.0) -> None:
        super().__init__(
            model_name="m", max_batch_size=max_batch_size, batch_wait_ms=0.0, arm_switch_hold_ms=arm_switch_hold_ms
        )
        self.started: list[float] = []
        self.weights_loaded: list[dict[str, Any]] = []

    def _run_batch(self, batch: list[Job]) -> None:
        self.started.append(time.monotonic())
        for job in batch:
            job.finish("length")

    def state_dict(self) -> dict[str, Any]:
        return {}

    def _check_weights(self, state_dict: dict[str, Any]) -> None:
        pass

    def _load_weights(self, state_dict: dict[str, Any]) -> None:
        self.weights_loaded.append(state_dict)
