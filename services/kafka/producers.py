"""librdkafka producer settings every rlfeed producer shares.

Co-partitioning needs every producer of generations.v1 and feedback.v1 to map a key to
the same partition. librdkafka's default partitioner (`consistent_random`, CRC32)
disagrees with the Java client's and aiokafka's (murmur2), so every librdkafka producer
here uses `murmur2_random`: the Kafka ecosystem's default. Producers in other languages
must use murmur2 too (kcat: `-X partitioner=murmur2_random`).
"""

from __future__ import annotations

KEY_PARTITIONER = "murmur2_random"


def producer_config(bootstrap: str) -> dict[str, object]:
    """The base confluent-kafka producer config; merge process-specific settings into it."""
    return {"bootstrap.servers": bootstrap, "partitioner": KEY_PARTITIONER}
