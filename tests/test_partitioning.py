"""Co-partitioning across clients: a key lands on the same partition whichever rlfeed
producer writes it (librdkafka with producer_config, aiokafka as the SDK uses it)."""

from __future__ import annotations

import uuid

from aiokafka import AIOKafkaProducer
from confluent_kafka import Producer

from schemas.topics import FEEDBACK, GENERATIONS
from services.kafka.producers import producer_config


async def test_librdkafka_and_aiokafka_agree_on_partitions(kafka_bootstrap: str, topic_prefix: str) -> None:
    keys = [uuid.uuid4().hex.encode() for _ in range(64)]
    rd_partitions: dict[bytes, int] = {}

    def on_delivery(err, msg) -> None:
        assert err is None, err
        rd_partitions[msg.key()] = msg.partition()

    producer = Producer(producer_config(kafka_bootstrap))
    for key in keys:
        producer.produce(GENERATIONS.full_name(topic_prefix), b"{}", key, on_delivery=on_delivery)
    assert producer.flush(30) == 0

    aio = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
    await aio.start()
    try:
        aio_partitions = {}
        for key in keys:
            meta = await aio.send_and_wait(FEEDBACK.full_name(topic_prefix), b"{}", key=key)
            aio_partitions[key] = meta.partition
    finally:
        await aio.stop()
    assert len(set(aio_partitions.values())) > 1, "keys should spread over partitions"
    assert rd_partitions == aio_partitions
