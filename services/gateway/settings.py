"""The gateway's settings (`RLFEED_` environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator

from services.config import RlfeedSettings


class GatewaySettings(RlfeedSettings):
    """The ingest gateway: HTTP in, Kafka (acks=all) out."""

    gateway_host: str = "127.0.0.1"
    """Interface the HTTP server binds to (0.0.0.0 to accept remote clients)."""
    gateway_port: int = 8080
    """TCP port of the HTTP server; 0 picks a free one (logged at start)."""
    keys_file: Path | None = None
    """JSON file of hashed API keys (`rlfeed keys create`); unset: home_dir/gateway-keys.json."""
    max_request_bytes: int = 1_048_576
    """Largest request body accepted; larger ones get 413 before they are read in full."""
    max_batch_events: int = 1000
    """Most events in one batch request; more get 413."""
    max_inflight_events: int = 20_000
    """Most events waiting for the broker's acknowledgement at once; a request that would
    exceed it gets 429 with Retry-After instead of queueing in memory."""
    produce_timeout_s: float = 10.0
    """How long an event may wait for the broker's acknowledgement (librdkafka
    message.timeout.ms); past it the request gets 503 and the client retries."""
    retry_after_s: int = 1
    """Retry-After (seconds) on 429 and 503 answers."""
    idempotency_window_s: float = 600.0
    """How long the gateway remembers an accepted event id: a retry within the window gets
    the original acceptance and is not produced again. Consumers dedupe by event_id too."""
    idempotency_max_entries: int = 1_000_000
    """Most event ids remembered (oldest forgotten first); ~150 bytes each."""
    dead_letter_max_inflight: int = 1000
    """Most rejected inputs waiting to be written to dlq.v1; beyond it they are only counted."""
    dead_letters_per_request: int = 16
    """Most dead letters one request may write (a batch of bad events writes the first ones)."""
    broker_probe_interval_s: float = 1.0
    """While the broker is down, how often the gateway checks whether it is back."""
    linger_ms: float = 2.0
    """librdkafka linger.ms: how long the producer waits to fill a batch (adds latency)."""
    enable_idempotence: bool = False
    """librdkafka enable.idempotence (no broker-side duplicates on producer retries). Off by
    default because some Kafka-protocol brokers (tansu) do not support it."""

    @model_validator(mode="after")
    def _check(self) -> GatewaySettings:
        if not 0 <= self.gateway_port < 65536:
            raise ValueError("gateway_port: must be 0..65535")
        for name in ("max_request_bytes", "max_batch_events", "max_inflight_events", "idempotency_max_entries"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1")
        if self.produce_timeout_s <= 0:
            raise ValueError("produce_timeout_s: must be > 0")
        if self.retry_after_s < 0:
            raise ValueError("retry_after_s: must be >= 0")
        if self.idempotency_window_s < 0:
            raise ValueError("idempotency_window_s: must be >= 0")
        if self.max_inflight_events < self.max_batch_events:
            raise ValueError("max_inflight_events: must be >= max_batch_events (a full batch must fit)")
        return self

    @property
    def resolved_keys_file(self) -> Path:
        """The API key file in use."""
        return self.keys_file if self.keys_file is not None else self.home_dir / "gateway-keys.json"
