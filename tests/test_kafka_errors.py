"""services/kafka/errors.py: which librdkafka errors mean the client must be replaced."""

from __future__ import annotations

from confluent_kafka import KafkaError

from services.kafka.errors import is_fatal


def test_a_fatal_error_delivered_to_consume_counts_without_its_flag() -> None:
    # consume() hands over librdkafka's fatal error as code _FATAL with the flag unset.
    delivered = KafkaError(KafkaError._FATAL)
    assert not delivered.fatal()
    assert is_fatal(delivered)
    assert is_fatal(KafkaError(KafkaError.FENCED_INSTANCE_ID, fatal=True))


def test_ordinary_errors_are_not_fatal() -> None:
    assert not is_fatal(KafkaError(KafkaError._PARTITION_EOF))
    assert not is_fatal(KafkaError(KafkaError.ILLEGAL_GENERATION))
    assert not is_fatal(KafkaError(KafkaError._TRANSPORT))
