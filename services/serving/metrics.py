"""Prometheus metrics of one replica (its own registry, so replicas can share a process)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PAUSE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ReplicaMetrics:
    """Counters and gauges served on /metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "rlfeed_serving_requests",
            "HTTP API requests by endpoint and status code.",
            ["endpoint", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "rlfeed_serving_request_latency_seconds",
            "Time from request to last token.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prompt_tokens = Counter("rlfeed_serving_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter("rlfeed_serving_completion_tokens", "Completion tokens generated.", registry=r)
        self.batch_size = Histogram(
            "rlfeed_serving_batch_size", "Requests per engine batch.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "rlfeed_serving_batch_seconds", "Wall time per engine batch.", buckets=LATENCY_BUCKETS_S, registry=r
        )
        self.swaps = Counter("rlfeed_serving_weight_swaps", "Weight versions swapped in.", registry=r)
        self.swap_failures = Counter(
            "rlfeed_serving_weight_swap_failures", "Model updates that failed to load (old weights kept).", registry=r
        )
        self.swap_seconds = Histogram(
            "rlfeed_serving_weight_load_seconds",
            "Time to materialise and swap in a version.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.swap_pause_seconds = Histogram(
            "rlfeed_serving_weight_swap_pause_seconds",
            "Time the generation lock is held to copy new weights in (no batch runs meanwhile).",
            buckets=PAUSE_BUCKETS_S,
            registry=r,
        )
        self.events_emitted = Counter(
            "rlfeed_serving_events_emitted", "Events handed to the Kafka producer.", ["topic"], registry=r
        )

    def gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        """A gauge whose value is read from `fn` at scrape time."""
        Gauge(name, doc, registry=self.registry).set_function(fn)

    def labelled_gauge(self, name: str, doc: str, label: str, fn: Callable[[], dict[str, float]]) -> None:
        """A gauge family read from `fn` (label value → number) at scrape time."""
        from prometheus_client.core import GaugeMetricFamily

        class _Collector:
            def collect(self):
                fam = GaugeMetricFamily(name, doc, labels=[label])
                for k, v in fn().items():
                    fam.add_metric([k], v)
                yield fam

        self.registry.register(_Collector())  # type: ignore[arg-type]

    def render(self) -> bytes:
        """The text exposition format."""
        return generate_latest(self.registry)


class VersionTrafficCounter:
    """Requests, failures and a latency histogram per policy version (thread-safe, cumulative).

    The engine thread counts requests and failures, the event loop latencies; the
    heartbeat reports `snapshot()` on replica-status.v1 (the rollout guardrails' input).
    Only the `keep_versions` most recently counted versions are kept (a rollout compares
    two): a stable version still serving while newer candidates come and go keeps its
    counters (evicting by version number dropped it, and its next answer raised)."""

    def __init__(self, keep_versions: int = 8) -> None:
        self.keep_versions = keep_versions
        self._lock = threading.Lock()
        self._counts: dict[int, dict[str, int]] = {}  # least recently counted first
        self._latency: dict[int, dict[str, int]] = {}

    def _entry(self, version: int) -> dict[str, int]:
        entry = self._counts.pop(version, None)
        if entry is None:
            entry = {"requests": 0, "failures": 0}
            self._latency[version] = {}
        self._counts[version] = entry  # now the most recent
        while len(self._counts) > self.keep_versions:
            old = next(iter(self._counts))
            del self._counts[old], self._latency[old]
        return entry

    def ran(self, version: int, requests: int, failures: int = 0) -> None:
        """`requests` ran on `version`, `failures` of them failed."""
        with self._lock:
            entry = self._entry(version)
            entry["requests"] += requests
            entry["failures"] += failures

    def answered(self, version: int, latency_ms: float) -> None:
        """A request on `version` was answered after `latency_ms`."""
        from services.rollout.latency import bucket_key

        key = bucket_key(latency_ms)
        with self._lock:
            self._entry(version)
            hist = self._latency[version]
            hist[key] = hist.get(key, 0) + 1

    def snapshot(self) -> list[dict]:
        """Each kept version's counters, as `ReplicaStatusEvent.traffic` entries (oldest first)."""
        with self._lock:
            return [
                {"version": v, **self._counts[v], "latency_ms_buckets": dict(self._latency[v])}
                for v in sorted(self._counts)
            ]
