"""How the SDK delivers a batch: HTTP to the gateway, or Kafka directly.

A transport either delivers every event of a batch or raises: `Retryable` (the broker or
gateway is busy or unreachable: back off, send the same events again) or `Rejected` (this
input will never be accepted: drop it, count it). Events keep their event_id on every
attempt, so a retry that follows a lost acknowledgement is deduplicated downstream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import orjson

from schemas.codec import encode, key_of
from schemas.events import Event
from schemas.topics import Topic

_FIELD_INDEX = re.compile(r"^events\.(\d+)(\.|$)")


class Retryable(Exception):
    """Try again later (after `retry_after_s`, if the server said so)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Rejected(Exception):
    """Permanent failure. `index` is the one bad event of the batch, if known."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class Transport:
    """Sends one batch of events of one topic."""

    async def send(self, topic: Topic, events: Sequence[Event]) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections."""


class HttpTransport(Transport):
    """POST /v1/<feedback|generations>/batch to the gateway (tenant comes from the API key)."""

    def __init__(self, url: str, api_key: str, *, timeout_s: float = 30.0, max_request_bytes: int = 1_048_576) -> None:
        import httpx

        self.max_request_bytes = max_request_bytes
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"},
            timeout=timeout_s,
        )

    @staticmethod
    def _path(topic: Topic) -> str:
        return "/v1/generations/batch" if topic.name.startswith("generations") else "/v1/feedback/batch"

    def bodies(self, events: Sequence[Event]) -> list[tuple[int, bytes]]:
        """The batch split into request bodies under max_request_bytes: (first index, body)."""
        out: list[tuple[int, bytes]] = []
        parts: list[bytes] = []
        start, size = 0, 16
        for i, ev in enumerate(events):
            part = orjson.dumps(ev.model_dump(mode="json", exclude_none=True, exclude={"tenant_id"}))
            if len(part) + 16 > self.max_request_bytes:
                raise Rejected(f"event of {len(part)} bytes exceeds the gateway's {self.max_request_bytes}", i)
            if parts and size + len(part) + 1 > self.max_request_bytes:
                out.append((start, b'{"events":[' + b",".join(parts) + b"]}"))
                parts, start, size = [], i, 16
            parts.append(part)
            size += len(part) + 1
        if parts:
            out.append((start, b'{"events":[' + b",".join(parts) + b"]}"))
        return out

    async def send(self, topic: Topic, events: Sequence[Event]) -> None:
        import httpx

        for start, body in self.bodies(events):
            try:
                resp = await self._http.post(self._path(topic), content=body)
            except httpx.TransportError as exc:
                raise Retryable(f"gateway unreachable: {exc!r}") from None
            if resp.status_code == 200:
                continue
            message = _error_message(resp)
            if resp.status_code in (408, 429) or resp.status_code >= 500:
                raise Retryable(f"gateway answered {resp.status_code}: {message}", _retry_after(resp))
            index = None
            field = _error_field(resp)
            if field and (m := _FIELD_INDEX.match(field)):
                index = start + int(m.group(1))
            raise Rejected(f"gateway answered {resp.status_code}: {message}", index)

    async def close(self) -> None:
        await self._http.aclose()


def _error_message(resp: Any) -> str:
    try:
        return str(resp.json()["error"]["message"])[:500]
    except Exception:
        return resp.text[:500]


def _error_field(resp: Any) -> str | None:
    try:
        return resp.json()["error"].get("field")
    except Exception:
        return None


def _retry_after(resp: Any) -> float | None:
    value = resp.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class KafkaTransport(Transport):
    """Produce straight to the topic with aiokafka (acks=all); the app names its tenant."""

    def __init__(self, bootstrap: str, *, topic_prefix: str = "", timeout_s: float = 30.0) -> None:
        self.bootstrap = bootstrap
        self.topic_prefix = topic_prefix
        self.timeout_s = timeout_s
        self._producer: Any = None

    async def _started(self) -> Any:
        if self._producer is None:
            from aiokafka import AIOKafkaProducer

            from services.kafka.security import aiokafka_options

            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                **aiokafka_options(),
                acks="all",
                linger_ms=5,
                request_timeout_ms=int(self.timeout_s * 1000),
                client_id="rlfeed-sdk",
            )
            try:
                await producer.start()
            except Exception as exc:
                await producer.stop()
                raise Retryable(f"broker unreachable: {exc!r}") from None
            self._producer = producer
        return self._producer

    async def send(self, topic: Topic, events: Sequence[Event]) -> None:
        import asyncio

        from aiokafka.errors import KafkaError, MessageSizeTooLargeError

        producer = await self._started()
        name = topic.full_name(self.topic_prefix)
        try:
            futures = [await producer.send(name, encode(ev), key=key_of(ev, topic.key)) for ev in events]
            await asyncio.gather(*futures)
        except MessageSizeTooLargeError as exc:
            raise Rejected(f"event too large for the broker: {exc!r}") from None
        except KafkaError as exc:
            raise Retryable(f"produce failed: {exc!r}") from None

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
