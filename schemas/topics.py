"""The topic registry: every topic rlfeed uses, its key, partitions and retention.

Topic names may carry a deployment-wide prefix (`RLFEED_TOPIC_PREFIX`), which lets
several stacks (or test cases) share one broker without seeing each other's events.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas.events import (
    DeadLetterEvent,
    Event,
    FeedbackEvent,
    ForgetEvent,
    GenerationEvent,
    ModelUpdateEvent,
    PreferenceEvent,
    ReplicaStatusEvent,
    RolloutEvent,
    SampleEvent,
)

DAY_MS = 86_400_000


@dataclass(frozen=True)
class Topic:
    """One Kafka topic of the contract."""

    name: str
    """Name without the deployment prefix, e.g. `feedback.v1`."""
    event: type[Event] | None
    """The pydantic model of its messages; None for internal topics (not a public contract)."""
    key: str
    """The event field used as the message key."""
    partitions: int
    compacted: bool = False
    retention_ms: int | None = 7 * DAY_MS
    """None keeps messages forever (compacted topics)."""
    extra_config: dict[str, str] = field(default_factory=dict)
    internal: bool = False
    """Internal state of one component (e.g. a changelog): created with the others, but
    not described by JSON Schema, not copied to ClickHouse, and free to change."""

    def full_name(self, prefix: str = "") -> str:
        """The topic's name on the broker."""
        return f"{prefix}{self.name}"

    def config(self) -> dict[str, str]:
        """Topic-level broker configs for creation."""
        cfg = {"cleanup.policy": "compact" if self.compacted else "delete"}
        cfg["retention.ms"] = str(self.retention_ms if self.retention_ms is not None else -1)
        cfg.update(self.extra_config)
        return cfg


# generations, feedback and samples are co-partitioned by generation_id: same count.
JOIN_PARTITIONS = 8

GENERATIONS = Topic("generations.v1", GenerationEvent, "generation_id", JOIN_PARTITIONS)
FEEDBACK = Topic("feedback.v1", FeedbackEvent, "generation_id", JOIN_PARTITIONS)
SAMPLES = Topic("samples.v1", SampleEvent, "generation_id", JOIN_PARTITIONS)
MODEL_UPDATES = Topic("model-updates.v1", ModelUpdateEvent, "model", 1, compacted=True, retention_ms=None)
REPLICA_STATUS = Topic("replica-status.v1", ReplicaStatusEvent, "replica_id", 1, retention_ms=3 * DAY_MS)
DLQ = Topic("dlq.v1", DeadLetterEvent, "key_b64", 1, retention_ms=30 * DAY_MS)
ROLLOUTS = Topic("rollouts.v1", RolloutEvent, "model", 1, compacted=True, retention_ms=None)
# Mined by streams at settle time, keyed like samples; kept a month for reward-model retraining.
PREFERENCES = Topic("preferences.v1", PreferenceEvent, "generation_id", JOIN_PARTITIONS, retention_ms=30 * DAY_MS)
# `rlfeed forget`: one record per forgotten (tenant, user), kept forever; the stream worker
# reads it whole and drops those users' samples (streams/forget.py).
FORGET_REQUESTS = Topic("forget-requests.v1", ForgetEvent, "event_id", 1, compacted=True, retention_ms=None)
# Internal: the streams join's state (streams/changelog.py), one partition per join partition.
# Its values are join state, not events.
JOIN_CHANGELOG = Topic(
    "streams-join-changelog.v1",
    None,
    "generation_id",
    JOIN_PARTITIONS,
    compacted=True,
    retention_ms=None,
    internal=True,
)

ALL_TOPICS: tuple[Topic, ...] = (
    GENERATIONS,
    FEEDBACK,
    SAMPLES,
    MODEL_UPDATES,
    REPLICA_STATUS,
    DLQ,
    ROLLOUTS,
    PREFERENCES,
    FORGET_REQUESTS,
    JOIN_CHANGELOG,
)
PUBLIC_TOPICS: tuple[Topic, ...] = tuple(t for t in ALL_TOPICS if not t.internal)
"""The public contract: topics whose events any consumer may read."""
BY_NAME: dict[str, Topic] = {t.name: t for t in ALL_TOPICS}


def topic_for_name(full_name: str, prefix: str = "") -> Topic:
    """The registry entry of a prefixed topic name; KeyError if it is not ours."""
    if not full_name.startswith(prefix):
        raise KeyError(full_name)
    return BY_NAME[full_name[len(prefix) :]]
