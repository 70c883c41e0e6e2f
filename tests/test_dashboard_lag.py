"""Consumer lag against the real broker: committed offsets vs high watermarks, into ClickHouse."""

from __future__ import annotations

from confluent_kafka import Consumer, Producer, TopicPartition

from schemas.topics import GENERATIONS
from services.dashboard.lag import LagProbe
from services.dashboard.monitor import Monitor
from services.dashboard.panels import Store
from services.dashboard.settings import DashboardSettings
from services.kafka.producers import producer_config


def test_lag_probe_reads_committed_offsets(kafka_bootstrap: str, topic_prefix: str, clickhouse) -> None:
    topic = GENERATIONS.full_name(topic_prefix)
    producer = Producer({**producer_config(kafka_bootstrap)})
    for _ in range(12):
        producer.produce(topic, b"{}", key=b"k", partition=0)
    assert producer.flush(30) == 0
    group = f"{topic_prefix}lag-group"
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        consumer.commit(offsets=[TopicPartition(topic, 0, 5)], asynchronous=False)
    finally:
        consumer.close()

    probe = LagProbe(kafka_bootstrap, [group, f"{topic_prefix}never-committed"])
    try:
        rows = probe.probe()
    finally:
        probe.close()
    assert [(r.topic, r.partition, r.committed, r.high_watermark, r.lag) for r in rows] == [(topic, 0, 5, 12, 7)]

    settings = DashboardSettings(lag_groups=[group], lag_alert_max_messages=5)
    monitor = Monitor(Store(clickhouse), settings, bootstrap=kafka_bootstrap)
    try:
        alerts = monitor.round()
    finally:
        monitor.close()
    assert [(a.rule, a.key, a.value) for a in alerts] == [("consumer_lag", f"{group}/{topic}", 7.0)]
    stored = clickhouse.query("SELECT consumer_group, topic, lag FROM consumer_lag").result_rows
    assert stored == [(group, topic, 7)]
    status = clickhouse.query("SELECT rule, status FROM alerts").result_rows
    assert status == [("consumer_lag", "firing")]
