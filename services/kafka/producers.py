"""librdkafka producer settings every rlfeed producer shares.

Co-partitioning needs every producer of generations.v1 and feedback.v1 to map a key to
the same partition. librdkafka's default partitioner (`consistent_random`, CRC32)
disagrees with the Java client's and aiokafka's (murmur2), so every librdkafka producer
here uses `murmur2_random`: the Kafka ecosystem's default. Producers in other languages
must use murmur2 too (kcat: `-X partitioner=murmur2_random`).
"""

from __future__ import annotations

from services.config import RlfeedSettings
from services.kafka.security import librdkafka_config

KEY_PARTITIONER = "murmur2_random"


def producer_config(bootstrap: str, settings: RlfeedSettings | None = None) -> dict[str, object]:
    """The base confluent-kafka producer config (with the security settings of
    `librdkafka_config`); merge process-specific settings into it."""
    return {**librdkafka_config(bootstrap, settings), "partitioner": KEY_PARTITIONER}
