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
- librdkafka: `EndPauses` pauses a partition each time the consumer reaches its end
  (partition EOF, `enable.partition.eof`) and resumes it `kafka_idle_pause_ms` later; the
  resumed fetch that finds nothing ends in EOF again. Measured (session 6, one idle
  consumer on one partition): 0.63 core in the client plus ~0.5 in noida-db before,
  0.004 after; a message produced during the quiet spell arrived 0.12 s later (0.5 s
  before `resume_due` also woke the broker thread, see there). Pausing
  after every *empty poll* instead (tried earlier) starves the consumer: a resumed
  partition is fetched again only after 0.1-2 s, so short pause cycles re-paused it
  before any fetch (not even EOF) arrived. EOF only comes after a fetch, so this cannot.
  Every librdkafka consumer of the project reads through `EndPauses.consume`. Idle
  `rlfeed up` + `rlfeed streams` (session 7, CPU time from /proc over 15 s): stack
  process 0.58 core, noida-db 0.84, stream worker 0.56 (1.99 of 2 cores) before;
  0.02, 0.02 and 0.04 after.
  The demo also runs its infrastructure processes (broker, sink, stream worker) at a
  lower CPU priority (`demo_infra_nice`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
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


class EndPauses:
    """Pause each partition a librdkafka consumer has read to its end, for `pause_ms`.

    Read through `consume` (the consumer needs `enable.partition.eof`): it resumes the
    partitions whose pause is over, polls no longer than the next resume, pauses the
    partitions whose end it meets, and returns everything but those end events. Against
    Kafka, which holds empty fetches itself, it adds at most `pause_ms` of latency after a
    quiet spell; 0 turns it off.

    A pause reorders partitions by up to `pause_ms`: a message may be read after one
    produced later to another partition (a generation after its feedback, say). librdkafka
    refetches from the application's position on a pause, so nothing fetched meanwhile is
    lost (tests/test_kafka_idle.py)."""

    def __init__(self, consumer: Any, pause_ms: int, wake_timeout_s: float = 0.1) -> None:
        self.consumer = consumer
        self.pause_s = max(pause_ms, 0) / 1000
        self.wake_timeout_s = wake_timeout_s
        self.ended: set[tuple[str, int]] = set()
        """Every partition this consumer has read to its end at least once."""
        self._due: dict[tuple[str, int], float] = {}

    def consume(self, num_messages: int, timeout_s: float) -> list[Any]:
        """Up to `num_messages` from the consumer, without the partition-EOF events (their
        partitions pause at once); like librdkafka's `consume`, it returns when it has
        `num_messages` or `timeout_s` has passed.

        librdkafka's own `consume(n, timeout)` waits out its timeout after an EOF while
        that partition is fetched again and again; so this waits with `poll`, which
        returns at the first event, and then takes what is already queued without waiting."""
        if self.pause_s <= 0:
            return self._without_ends(self.consumer.consume(num_messages, timeout_s), [])
        deadline = time.monotonic() + timeout_s
        out: list[Any] = []
        while True:
            self.resume_due()
            first = self.consumer.poll(self.poll_timeout_s(max(0.0, deadline - time.monotonic())))
            if first is not None:
                self._without_ends([first], out)
                if len(out) < num_messages:
                    self._without_ends(self.consumer.consume(num_messages - len(out), 0), out)
            if len(out) >= num_messages or time.monotonic() >= deadline:
                return out

    def _without_ends(self, messages: list[Any], out: list[Any]) -> list[Any]:
        """Append `messages` to `out`, pausing (not appending) those that are EOF events."""
        from confluent_kafka import KafkaError

        for msg in messages:
            err = msg.error()
            if err is not None and err.code() == KafkaError._PARTITION_EOF:
                self.reached_end(msg.topic(), msg.partition())
            else:
                out.append(msg)
        return out

    def reached_end(self, topic: str, partition: int) -> None:
        """The consumer read `topic`/`partition` to its end: stop fetching it for a while."""
        self.ended.add((topic, partition))
        if self.pause_s <= 0 or (topic, partition) in self._due:
            return
        from confluent_kafka import TopicPartition

        with contextlib.suppress(Exception):  # revoked meanwhile: nothing to pause
            self.consumer.pause([TopicPartition(topic, partition)])
            self._due[(topic, partition)] = time.monotonic() + self.pause_s

    def resume_due(self) -> None:
        """Resume the partitions whose pause is over."""
        if not self._due:
            return
        from confluent_kafka import TopicPartition

        now = time.monotonic()
        due = [key for key, at in self._due.items() if at <= now]
        for key in due:
            del self._due[key]
        if due:
            with contextlib.suppress(Exception):  # revoked meanwhile, or the broker is down
                parts = [TopicPartition(t, p) for t, p in due]
                self.consumer.resume(parts)
                # librdkafka looks at a resumed partition again only when its broker thread
                # wakes (up to 1 s later: 0.5 s of latency on average, measured); a request
                # to that broker wakes it now (0.1 s measured). Only the sending matters:
                # the wait for the answer is short, so a broker that is down costs little.
                self.consumer.get_watermark_offsets(parts[0], timeout=self.wake_timeout_s, cached=False)

    def poll_timeout_s(self, longest_s: float) -> float:
        """How long the next poll may block: `longest_s`, or less when a pause ends sooner."""
        if not self._due:
            return longest_s
        return max(0.0, min(longest_s, min(self._due.values()) - time.monotonic()))
