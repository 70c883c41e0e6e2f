"""Create and inspect the registry's topics on a broker (confluent-kafka admin)."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from schemas.topics import ALL_TOPICS, Topic
from services.kafka.security import librdkafka_config


@dataclass(frozen=True)
class TopicInfo:
    """A topic as the broker describes it."""

    name: str
    partitions: int
    registry: Topic | None


def admin(bootstrap: str) -> AdminClient:
    """An admin client for `bootstrap` (`host:port,...`), with the security settings."""
    return AdminClient(librdkafka_config(bootstrap))


def ensure_topics(
    bootstrap: str, prefix: str = "", topics: tuple[Topic, ...] = ALL_TOPICS, timeout_s: float = 30.0
) -> list[str]:
    """Create every registry topic that does not exist yet; return the names created.

    Idempotent: an existing topic is left as it is (a partition count that differs from
    the registry raises, because co-partitioning would silently break).
    """
    client = admin(bootstrap)
    existing = client.list_topics(timeout=timeout_s).topics
    wanted = {t.full_name(prefix): t for t in topics}
    for name, topic in wanted.items():
        if name in existing and len(existing[name].partitions) != topic.partitions:
            raise RuntimeError(
                f"topic {name} has {len(existing[name].partitions)} partitions, the registry says {topic.partitions}"
            )
    new = [
        NewTopic(name, num_partitions=t.partitions, replication_factor=-1, config=t.config())
        for name, t in wanted.items()
        if name not in existing
    ]
    created = []
    if new:
        for name, future in client.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s).items():
            try:
                future.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise
    return created


def list_topics(bootstrap: str, prefix: str = "", timeout_s: float = 10.0) -> list[TopicInfo]:
    """Every topic on the broker with its partition count and registry entry, if any."""
    meta = admin(bootstrap).list_topics(timeout=timeout_s)
    registry = {t.full_name(prefix): t for t in ALL_TOPICS}
    return sorted(
        (TopicInfo(name, len(m.partitions), registry.get(name)) for name, m in meta.topics.items()),
        key=lambda t: t.name,
    )
