"""Idle consumers must not spin: aiokafka pauses after every empty fetch.

Kafka holds a fetch that finds no data for `fetch.wait.max.ms` before answering. The
embedded broker (noida-db 0.2.3) answers at once, and both client libraries send the
next fetch as soon as an empty answer arrives, so a consumer waiting for data sends
thousands of fetches a second. Measured on an idle `rlfeed up` + `rlfeed streams` (2
cores, no events): ~3k fetch requests/s per librdkafka consumer; the Faust worker's
aiokafka fetcher took 80% of a core, noida-db 45%.

- aiokafka (the Faust worker's consumer): `pause_aiokafka_empty_fetches` makes the fetcher
  sleep `kafka_idle_pause_ms` after a fetch that brought no records, before its next fetch
  to that broker. Against Kafka this adds at most that much latency after a quiet spell.
- librdkafka: no client-side equivalent works. Pausing the partitions after an empty poll
  and resuming them was tried and starves the consumer: a resumed partition is fetched
  again only after 0.1-2 s, so with short pause cycles nothing (not even partition EOF)
  arrived for 30 s. The demo runs its infrastructure processes (broker, sink, stream
  worker) at a lower CPU priority instead (`demo_infra_nice`), so their spinning uses
  only what the model processes leave idle.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

_patched_pause_s: float | None = None


def pause_aiokafka_empty_fetches(pause_ms: int) -> None:
    """Make every aiokafka consumer in this process wait `pause_ms` after an empty fetch
    (patched once per process; a later call changes the pause; 0 turns it off)."""
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
