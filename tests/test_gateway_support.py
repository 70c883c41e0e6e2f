"""Shared helpers and fixtures of the gateway and SDK tests (no tests here)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from schemas.codec import decode
from schemas.events import Event


@dataclass
class GatewayEnv:
    """A running gateway on a real broker, with two tenants' keys."""

    url: str
    bootstrap: str
    prefix: str
    keys_file: Path
    keys: dict[str, str]
    """tenant -> plain API key."""
    server: object

    def auth(self, tenant: str = "acme") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[tenant]}"}


def start_gateway(bootstrap: str, prefix: str, keys_file: Path, **overrides: object):
    """A started GatewayServer on a free loopback port."""
    from services.gateway.server import GatewayServer
    from services.gateway.settings import GatewaySettings

    settings = GatewaySettings(
        gateway_host="127.0.0.1", gateway_port=0, keys_file=keys_file, topic_prefix=prefix, kafka_url=None, **overrides
    )
    return GatewayServer(settings, bootstrap).start()


@pytest.fixture(scope="module")
def gateway_env(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayEnv]:
    """One gateway for a test module, on its own topic prefix."""
    from services.apikeys import create_key
    from services.kafka.topics import ensure_topics

    prefix = f"g{uuid.uuid4().hex[:10]}."
    ensure_topics(kafka_bootstrap, prefix)
    keys_file = tmp_path_factory.mktemp("gwkeys") / "gateway-keys.json"
    keys = {tenant: create_key(keys_file, tenant) for tenant in ("acme", "globex")}
    server = start_gateway(kafka_bootstrap, prefix, keys_file)
    try:
        yield GatewayEnv(server.url, kafka_bootstrap, prefix, keys_file, keys, server)
    finally:
        server.stop()


def read_topic(bootstrap: str, topic: str, timeout_s: float = 30.0) -> list[tuple[bytes | None, bytes]]:
    """Every message now in `topic` (up to each partition's end offset): (key, value)."""
    from confluent_kafka import Consumer, TopicPartition

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
        ends = {}
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])
        out: list[tuple[bytes | None, bytes]] = []
        positions = dict.fromkeys(ends, -1)
        deadline = time.monotonic() + timeout_s
        while any(positions[p] + 1 < ends[p] for p in ends):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out reading {topic}: at {positions}, ends {ends}")
            for msg in consumer.consume(500, timeout=0.5):
                if msg.error() is None:
                    out.append((msg.key(), msg.value()))
                    positions[msg.partition()] = msg.offset()
        return out
    finally:
        consumer.close()


def read_events(bootstrap: str, topic: str, model: type[Event], timeout_s: float = 30.0) -> list[Event]:
    """`read_topic`, decoded."""
    return [decode(model, value) for _, value in read_topic(bootstrap, topic, timeout_s)]


def wait_for(cond, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll `cond` until true; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)
