"""What a consumer must treat as fatal among librdkafka's errors."""

from __future__ import annotations

from confluent_kafka import KafkaError


def is_fatal(err: KafkaError) -> bool:
    """True if the client that reported `err` is dead and must be replaced.

    librdkafka hands a fatal error (e.g. a static member fenced after a broker restart) to
    `consume()` as a message whose error code is `_FATAL`, and confluent-kafka builds that
    KafkaError without its `fatal()` flag: checking the flag alone misses it, and the
    consumer then polls on forever and never gets another message.
    """
    return err.fatal() or err.code() == KafkaError._FATAL
