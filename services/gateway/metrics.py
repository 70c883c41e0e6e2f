"""Prometheus metrics of one gateway (its own registry)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from services.gateway.app import Gateway

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    """Counters, a latency histogram and gauges read at scrape time."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "rlfeed_gateway_requests", "HTTP requests by endpoint and status code.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "rlfeed_gateway_request_latency_seconds",
            "Time from request to answer (includes waiting for the broker's acks).",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.events = Counter(
            "rlfeed_gateway_events",
            "Events by topic and outcome: accepted (acked by Kafka), duplicate (answered from the idempotency "
            "window), rejected (invalid, dead-lettered), failed (not acked in time), throttled (429), "
            "unavailable (503, broker down).",
            ["topic", "outcome"],
            registry=r,
        )

    def bind(self, gw: Gateway) -> None:
        """Gauges that read the gateway's state at scrape time."""
        r = self.registry
        Gauge("rlfeed_gateway_inflight_events", "Events waiting for the broker's acks.", registry=r).set_function(
            lambda: gw.sink.inflight
        )
        Gauge("rlfeed_gateway_max_inflight_events", "Admission bound on in-flight events.", registry=r).set_function(
            lambda: gw.sink.max_inflight_events
        )
        Gauge("rlfeed_gateway_broker_up", "1 while the broker is reachable.", registry=r).set_function(
            lambda: 1.0 if gw.sink.available else 0.0
        )
        Gauge("rlfeed_gateway_producer_queue", "Messages librdkafka holds.", registry=r).set_function(gw.sink.pending)
        Gauge("rlfeed_gateway_idempotency_entries", "Event ids remembered.", registry=r).set_function(
            lambda: len(gw.cache)
        )
        dl = Gauge(
            "rlfeed_gateway_dead_letters",
            "Dead letters by outcome (written, failed, dropped).",
            ["outcome"],
            registry=r,
        )
        for outcome in ("written", "failed", "dropped"):
            dl.labels(outcome).set_function(lambda o=outcome: gw.sink.dead_letters[o])

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
