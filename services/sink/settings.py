"""Settings of the ClickHouse sink process."""

from __future__ import annotations

from services.config import RlfeedSettings


class SinkSettings(RlfeedSettings):
    """`rlfeed sink`: every topic into ClickHouse. Env prefix `RLFEED_`."""

    sink_group_id: str = "rlfeed-sink"
    """Kafka consumer group of the sink (one group reads every topic), after the topic prefix."""
    sink_group_instance_id: str | None = None
    """Static group membership (Kafka's group.instance.id): a stable name per sink process
    (e.g. the pod name). A sink restarted after kill -9 then gets its partitions back at
    once instead of waiting for the broker to expire the dead member, which the embedded
    broker never does."""
    sink_batch_max_events: int = 50_000
    """Most messages inserted per batch. Large on purpose: every insert has a fixed cost
    (tens of ms on chdb, a round trip and a new part on a server) per table, and a batch
    makes one insert per table it touches."""
    sink_batch_max_wait_s: float = 1.0
    """Longest a batch waits to fill before it is inserted."""
    sink_session_timeout_s: float = 45.0
    """Consumer group session timeout: how long a dead sink (kill -9) keeps its partitions
    before the group gives them to another member (librdkafka's default)."""
    sink_max_poll_interval_s: float = 300.0
    """librdkafka's max.poll.interval.ms, also the group's rebalance timeout: some brokers
    (noida-db) wait this long for a killed member before a restarted sink gets its
    partitions. Must be >= sink_session_timeout_s."""
    sink_retry_initial_s: float = 0.5
    """First back-off after a failed insert; doubles up to sink_retry_max_s."""
    sink_retry_max_s: float = 30.0
    """Longest back-off between insert retries (retries go on until ClickHouse answers)."""
