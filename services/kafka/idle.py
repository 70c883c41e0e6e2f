"""Idle consumers must not spin: a pause after every empty fetch.

Kafka holds a fetch that finds no data for `fetch.wait.max.ms` before answering. The
embedded broker (noida-db 0.2.3) answers at once, and both client libraries send the
next fetch as soon as an empty answer arrives, so a consumer waiting for data sends
thousands of fetches a second. Measured on an idle `rlfeed up` + `rlfeed streams` (2
cores): ~3k fetch requests/s per librdkafka consumer, the Faust worker at 80% of a core
(its aiokafka fetcher), noida-db at 45%, before any event was sent.

The backoff is therefore on the client side, for both libraries:
- librdkafka (`consume_or_pause`): when a poll returns nothing, the assigned partitions
  are paused for `kafka_idle_pause_ms` (a paused partition is not fetched), then resumed.
  Polls are kept short (`kafka_idle_poll_ms`), since librdkafka keeps fetching while
  a poll waits.
- aiokafka (`pause_aiokafka_empty_fetches`, used by the Faust worker): the fetcher sleeps
  `kafka_idle_pause_ms` after a fetch that brought no records before its next fetch to
  that broker.

Against Kafka the pause only adds up to `kafka_idle_pause_ms` of latency to the first
event after a quiet spell; 0 turns both off.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from confluent_kafka import Consumer, KafkaException, Message


def consume_or_pause(
    consumer: Consumer, num_messages: int, timeout_s: float, poll_ms: int, pause_ms: int
) -> list[Message]:
    """`consumer.consume(num_messages, timeout)`, but an empty poll is followed by a pause
    of the assigned partitions for `pause_ms`. Waits at most about `timeout_s` when
    `poll_ms` and `pause_ms` fit in it; `pause_ms` 0 is a plain consume."""
    if pause_ms <= 0:
        return consumer.consume(num_messages=num_messages, timeout=timeout_s)
    messages = consumer.consume(num_messages=num_messages, timeout=min(timeout_s, poll_ms / 1000))
    if messages:
        return messages
    idle_s = min(pause_ms / 1000, max(timeout_s - poll_ms / 1000, 0.0))
    if idle_s <= 0:
        return messages
    try:
        assigned = consumer.assignment()
    except KafkaException:
        assigned = []
    if not assigned:
        time.sleep(idle_s)
        return messages
    consumer.pause(assigned)
    try:
        time.sleep(idle_s)
    finally:
        # A rebalance during the pause may have revoked some; the new assignment is not paused.
        with contextlib.suppress(KafkaException):
            consumer.resume(assigned)
    return messages


_patched_pause_s: float | None = None


def pause_aiokafka_empty_fetches(pause_ms: int) -> None:
    """Make every aiokafka consumer in this process wait `pause_ms` after an empty fetch
    (once per process; a later call changes the pause)."""
    global _patched_pause_s
    from aiokafka.consumer.fetcher import Fetcher

    first = _patched_pause_s is None
    _patched_pause_s = max(pause_ms, 0) / 1000
    if not first:
        return
    original = Fetcher._proc_fetch_request

    async def proc_fetch_request(self: Any, assignment: Any, node_id: int, request: Any) -> bool:
        got_records = await original(self, assignment, node_id, request)
        if not got_records and _patched_pause_s:
            # Closing, the fetcher cancels its pending fetches and awaits them expecting a
            # result, as a fetch cancelled mid-request would give: the pause ends quietly.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(_patched_pause_s)
        return got_records

    Fetcher._proc_fetch_request = proc_fetch_request
