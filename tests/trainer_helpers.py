"""Shared helpers of the trainer tests: sample events and topic reading."""

from __future__ import annotations

import random
import time

from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.codec import encode, key_of
from schemas.events import SampleEvent, SettleReason
from schemas.topics import SAMPLES
from services.kafka.producers import producer_config

MODEL = "tiny-policy"


def make_samples(
    n: int, *, seed: int = 0, group: int = 2, policy_version: int = 0, vocab: int = 1000
) -> list[SampleEvent]:
    """n samples, `group` per prompt, with varied rewards and plausible logprobs."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [1 + (i // group) % 50, 5, 17 + i // group]
        completion = [rng.randrange(10, vocab) for _ in range(rng.randint(2, 8))]
        out.append(
            SampleEvent(
                generation_id=f"g{seed}-{i}",
                model=MODEL,
                policy_version=policy_version,
                prompt="p",
                completion="c",
                prompt_token_ids=prompt,
                completion_token_ids=completion,
                completion_logprobs=[-rng.uniform(5.0, 9.0) for _ in completion],
                reward=float(rng.choice([0.0, 1.0, 0.5, -0.25])),
                reward_components={},
                feedback_event_ids=[],
                settle_reason=SettleReason.TERMINAL,
                user_id="u1",
                generated_at_ms=1,
            )
        )
    return out


def produce(bootstrap: str, topic: str, events: list, key_field: str = SAMPLES.key) -> None:
    p = Producer({**producer_config(bootstrap), "linger.ms": 5})
    for ev in events:
        p.produce(
            topic,
            encode(ev) if not isinstance(ev, bytes) else ev,
            key=key_of(ev, key_field) if not isinstance(ev, bytes) else b"junk",
        )
    assert p.flush(30) == 0


def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe"})
    try:
        return {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in range(partitions)}
    finally:
        c.close()


def read_all(bootstrap: str, topic: str, timeout_s: float = 10.0, expect: int | None = None) -> list[bytes]:
    """Every message value of a (small) topic, from the beginning."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"probe-{time.time_ns()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe([topic])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for m in c.consume(100, timeout=0.5):
                if m.error() is None:
                    out.append(m.value())
            if expect is not None and len(out) >= expect:
                break
    finally:
        c.close()
    return out
