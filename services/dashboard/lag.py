"""Consumer lag: committed offsets of consumer groups against the partitions' high watermarks."""

from __future__ import annotations

import logging

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient

from services.dashboard.alerts import LagRow
from services.kafka.security import librdkafka_config
from services.logs import event

log = logging.getLogger("rlfeed.dashboard.lag")
PROBE_GROUP = "rlfeed-lag-probe"
"""group.id of the watermark consumer; it never subscribes, so it never joins a group."""


class LagProbe:
    """Reads lag for a fixed list of consumer groups; reuse one probe for every round."""

    def __init__(self, bootstrap: str, groups: list[str], timeout_s: float = 5.0) -> None:
        self.groups = groups
        self.timeout_s = timeout_s
        self.admin: AdminClient | None = AdminClient(librdkafka_config(bootstrap))
        self.consumer = Consumer({**librdkafka_config(bootstrap), "group.id": PROBE_GROUP, "enable.auto.commit": False})

    def close(self) -> None:
        """Close the watermark consumer and drop the admin client (it has no close())."""
        self.consumer.close()
        self.admin = None

    def committed(self, group: str) -> list[TopicPartition]:
        """The partitions `group` has committed offsets on (empty for an unknown group)."""
        assert self.admin is not None, "probe is closed"
        futures = self.admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=self.timeout_s
        )
        result = futures[group].result(timeout=self.timeout_s)
        return [tp for tp in result.topic_partitions or [] if tp.offset >= 0 and not tp.error]

    def probe(self) -> list[LagRow]:
        """One LagRow per committed partition of every group; a failing group is logged and skipped."""
        rows = []
        for group in self.groups:
            try:
                for tp in self.committed(group):
                    _low, high = self.consumer.get_watermark_offsets(
                        TopicPartition(tp.topic, tp.partition), timeout=self.timeout_s
                    )
                    rows.append(LagRow(group, tp.topic, tp.partition, tp.offset, high))
            except Exception as exc:  # a broker hiccup must not stop the alert loop
                event(log, "lag_probe_failed", logging.WARNING, group=group, error=str(exc)[:300])
        return rows
