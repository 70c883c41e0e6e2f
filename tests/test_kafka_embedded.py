"""The embedded broker keeps every write it acknowledged across a stop and a restart.

A bare SIGINT does not: noida-db saves, then goes on acknowledging produce requests until
it exits (thousands of acked writes lost per stop under a steady producer), which is how
the chaos test lost an accepted feedback event about one run in four."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from services.kafka.embedded import EmbeddedBroker
from tests.trainer_helpers import end_offsets

PARTITIONS = 4


def test_stop_while_a_producer_writes_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "broker").start()
    port = broker.port
    try:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        admin.create_topics([NewTopic("t", PARTITIONS, 1)])["t"].result(10)
        acked: list[bool] = []

        def on_delivery(err: object, _msg: object) -> None:
            acked.append(err is None)

        producer = Producer(
            {"bootstrap.servers": broker.bootstrap, "acks": "all", "linger.ms": 0, "message.timeout.ms": 2000}
        )
        stopped = threading.Event()

        def stop_midway() -> None:
            time.sleep(0.7)
            broker.stop()
            stopped.set()

        stopper = threading.Thread(target=stop_midway)
        stopper.start()
        i = 0
        while not stopped.is_set():
            producer.produce("t", key=str(i).encode(), value=b"x" * 200, on_delivery=on_delivery)
            producer.flush(3)
            i += 1
        producer.flush(3)
        del producer  # no reconnecting to the restarted broker
        stopper.join()
        assert sum(acked) > 100, "the producer barely wrote before the stop"

        broker = EmbeddedBroker(tmp_path / "broker", port=port).start()
        # At least every acknowledged write (a write whose ack was cut off may be kept too).
        assert sum(end_offsets(broker.bootstrap, "t", PARTITIONS).values()) >= sum(acked)
    finally:
        broker.stop()
