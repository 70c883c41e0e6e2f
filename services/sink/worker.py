"""The sink loop: consume every registry topic, insert rows, then commit offsets.

Ordering, per batch (the only place it is written down):
  1. Poll up to `sink_batch_max_events` messages, waiting at most `sink_batch_max_wait_s`.
  2. Decode each against the contract (`schemas.fast.counted_batch_decoder`, msgspec; anything
     it does not accept goes to `codec.decode`, the reference). An invalid message becomes a dead
     letter with the original bytes, the field named and a deterministic event id. It is
     produced to dlq.v1 (and so reaches the dead_letters table when the sink reads dlq.v1
     back); an invalid message *on* dlq.v1 goes straight into dead_letters, so nothing
     loops.
  3. Insert every table's rows (one JSONCompactColumns document per table, parsed by
     ClickHouse in C++, `rows.json_columns`); on failure back off and retry,
     committing nothing, until ClickHouse accepts or the sink is stopped.
  4. Flush the dead-letter producer (acks=all).
  5. Commit the batch's offsets synchronously.
A crash before step 5 redelivers the batch; so does a failed commit (partitions revoked,
or the consumer fenced after a broker restart: a consumer with a fatal error is replaced).
Inserts are idempotent by event_id (ReplacingMergeTree; read with FINAL), so redelivery
neither loses nor doubles a row.

`run` overlaps batches: while batch N is inserted, flushed and committed (3-5, on one
insert thread, right after each other, as the consumer and producer are thread-safe),
batch N+1 is polled and decoded (1-2); N+1 is handed over only once N is done. Inserts
and commits stay one at a time and in order, and a batch's offsets are committed only
after its own insert succeeded. `run_once` does one batch without overlap.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
import typing
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from schemas.codec import MAX_MESSAGE_BYTES, InvalidEvent, dead_letter, decode, encode, key_of
from schemas.events import Event
from schemas.fast import DecodeError, counted_batch_decoder, counted_decoder, fast_decoder
from schemas.topics import DLQ, PUBLIC_TOPICS, Topic, topic_for_name
from services.kafka.errors import is_fatal
from services.kafka.idle import EndPauses
from services.kafka.producers import producer_config
from services.kafka.security import librdkafka_config
from services.logs import event
from services.sink.rows import INSERT_FORMAT, SPECS, TableSpec, json_columns
from services.sink.settings import SinkSettings

log = logging.getLogger("rlfeed.sink")
INSERT_SETTINGS = {"max_partitions_per_insert_block": 0, "optimize_on_insert": 0}
"""ClickHouse settings of the sink's inserts.

- No limit on partitions per insert: the event tables are partitioned by month of
  event_time, and ClickHouse refuses an insert touching more than 100 partitions by
  default; one batch of valid events spread over 100 months (event_time_ms is the
  producer's) would then fail forever, and the sink retry it forever. Such a batch is
  slow to insert (a part per month), never stuck.
- No deduplication while inserting (ReplacingMergeTree merges a block on insert by
  default): ~20% of the insert's CPU (2.9 vs 3.6 us/row in chdb, same run), and no
  reader relies on it. Duplicates within a batch are then kept until a merge, exactly as
  duplicates across batches (redelivery) always are: readers use FINAL, and the
  materialized views see the inserted block either way."""
REJECTED_BY = "sink"

_gc_lock = threading.Lock()
_gc_holders = [0]


@contextlib.contextmanager
def gc_paused() -> typing.Iterator[None]:
    """No cyclic garbage collection while the body runs (in any thread).

    Decoding a batch allocates a few container objects per message (row tuples, lists)
    and keeps them until the insert: the collector, run every 700 allocations, then
    walks the whole growing batch again and again, which cost more CPU than the decoding
    itself. Nothing the sink builds has a reference cycle, so nothing is missed; the
    collector runs as usual between batches. Threads nest (the decoding thread and the
    insert thread overlap); a collector that was off already stays off."""
    with _gc_lock:
        if _gc_holders[0] == 0:
            _gc_holders.append(gc.isenabled())
            gc.disable()
        _gc_holders[0] += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_holders[0] -= 1
            if _gc_holders[0] == 0 and _gc_holders.pop():
                gc.enable()


@dataclass(frozen=True)
class _Route:
    """How the messages of one (prefixed) topic are decoded and where their rows go."""

    topic: Topic
    model: type[Event]
    spec: TableSpec
    fast: Callable[[bytes], Any] | None
    """The derived msgspec decoder (None: this model is validated by pydantic only)."""
    batch: Callable[[list[bytes]], list[Any]] | None
    """The same for a batch of values: a struct per value, None where it refuses one."""


@dataclass
class _Batch:
    """Decoded messages waiting for their insert: rows per table, offsets to commit."""

    rows: dict[str, list[tuple]]
    offsets: dict[tuple[str, int], int]
    count: int


@dataclass
class SinkStats:
    """Counters since the sink started."""

    batches: int = 0
    messages: int = 0
    rows: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    dead_letters: int = 0
    insert_failures: int = 0
    commit_failures: int = 0
    consumer_renewals: int = 0
    """Consumers replaced after a fatal error (e.g. fenced after a broker restart)."""
    slow_path: int = 0
    """Messages the fast decoder did not accept, decided by `codec.decode` instead."""
    last_commit_ts: float | None = None

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "messages": self.messages,
            "rows": dict(self.rows),
            "dead_letters": self.dead_letters,
            "insert_failures": self.insert_failures,
            "commit_failures": self.commit_failures,
            "consumer_renewals": self.consumer_renewals,
            "slow_path": self.slow_path,
            "last_commit_ts": self.last_commit_ts,
        }


def _one_by_one(decode: Callable[[bytes], Any]) -> Callable[[list[bytes]], list[Any]]:
    """A batch decoder from a single-value one (None where it refuses a value)."""

    def one(raw: bytes) -> Any:
        try:
            return decode(raw)
        except DecodeError:
            return None

    return lambda values: [one(raw) for raw in values]


class Sink:
    """One sink consumer. `run(stop)` loops until `stop` is set; `run_once()` does one batch."""

    def __init__(self, settings: SinkSettings, bootstrap: str, client: Client) -> None:
        self.settings = settings
        self.client = client
        self.prefix = settings.topic_prefix
        self.stats = SinkStats()
        self._bootstrap = bootstrap
        self._fatal = False
        self.consumer = self._new_consumer()
        self.producer = Producer({**producer_config(bootstrap, settings), "acks": "all", "linger.ms": 5})
        self._routes: dict[str, _Route] = {}
        self._specs: dict[str, TableSpec] = {spec.table: spec for spec in SPECS.values()}

    def _new_consumer(self) -> Consumer:
        """A consumer in the sink's group, subscribed to every public topic."""
        settings = self.settings
        consumer = Consumer(
            {
                **librdkafka_config(self._bootstrap, settings),
                "group.id": f"{settings.topic_prefix}{settings.sink_group_id}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,  # for EndPauses
                "session.timeout.ms": int(settings.sink_session_timeout_s * 1000),
                "max.poll.interval.ms": int(settings.sink_max_poll_interval_s * 1000),
                # A broker may answer one fetch with far more than fetch.max.bytes: noida-db
                # sent a backlog of 1M events (1 GB) as one response, which the default
                # bound (100 MB) refuses, forever. Kafka itself keeps to fetch.max.bytes.
                "receive.message.max.bytes": 2_147_483_647,
                **({"group.instance.id": settings.sink_group_instance_id} if settings.sink_group_instance_id else {}),
            }
        )
        consumer.subscribe([t.full_name(self.prefix) for t in PUBLIC_TOPICS])
        self.pauses = EndPauses(consumer, settings.kafka_idle_pause_ms)
        return consumer

    def _renew_consumer(self) -> None:
        """Replace a consumer that hit a fatal error (e.g. fenced by its own static member
        id after a broker restart): what it had not committed is redelivered to the new
        one, and the tables' dedup keys absorb the repeat."""
        event(log, "consumer_renewed", logging.WARNING)
        with contextlib.suppress(Exception):
            self.consumer.close()
        self._fatal = False
        self.stats.consumer_renewals += 1
        self.consumer = self._new_consumer()

    def close(self) -> None:
        """Leave the group (uncommitted work is redelivered to the next owner)."""
        self.consumer.close()
        self.producer.flush(10)

    def run(self, stop: threading.Event) -> None:
        """Process batches until `stop` is set, inserting one batch while polling the next."""
        with ThreadPoolExecutor(1, thread_name_prefix="sink-insert") as inserter:
            stored: Future[bool] | None = None
            while not stop.is_set():
                batch = self._poll()
                if stored is not None and not stored.result():
                    return  # stopped during an outage: that batch (and this one) are not committed
                stored = None if batch is None else inserter.submit(self._store, batch, stop)
                if self._fatal:
                    if stored is not None and not stored.result():
                        return
                    stored = None
                    self._renew_consumer()
            if stored is not None:
                stored.result()

    def run_once(self, stop: threading.Event | None = None) -> int:
        """Poll, insert and commit one batch; return the number of messages in it."""
        batch = self._poll()
        if batch is not None and self._insert(batch.rows, stop):
            self._commit(batch)
        if self._fatal:
            self._renew_consumer()
        return 0 if batch is None else batch.count

    def _poll(self) -> _Batch | None:
        """Steps 1-2: one batch of messages, decoded into rows (None when there were none)."""
        messages = self.pauses.consume(self.settings.sink_batch_max_events, self.settings.sink_batch_max_wait_s)
        if not messages:
            return None
        with gc_paused():
            return self._decode(messages)

    def _decode(self, messages: list[Message]) -> _Batch | None:
        """Step 2: rows per table and offsets per partition of the batch's messages.

        The hot path, per topic: one list of values, one msgspec decode per message
        (validating while it parses; ids checked once for the batch,
        `schemas.fast.counted_batch_decoder`) and one tuple per row, in list
        comprehensions; what the fast decoder refuses goes to the reference decoder,
        message by message."""
        groups: dict[str, list[Message]] = {}
        for msg in messages:
            if msg.error() is not None:
                self._ok(msg)
                continue
            name = msg.topic()
            group = groups.get(name)
            if group is None:
                group = groups[name] = []
            group.append(msg)
        rows: dict[str, list[tuple]] = defaultdict(list)
        offsets: dict[tuple[str, int], int] = {}
        routes = self._routes
        count = 0
        for name, group in groups.items():
            route = routes.get(name) or self._add_route(name)
            values = [msg.value() or b"" for msg in group]
            table = rows[route.spec.table]
            table.extend(self._rows(route, group, values))
            # Messages of one partition arrive in offset order: the last one is the highest.
            offsets.update({(name, msg.partition()): msg.offset() for msg in group})
            count += len(group)
        return _Batch(rows, offsets, count) if count else None

    def _rows(self, route: _Route, group: list[Message], values: list[bytes]) -> list[tuple]:
        """The rows of one topic's messages (dead-lettering the invalid ones)."""
        row = route.spec.row
        decoded: list[Any] = [None] * len(values)
        if route.batch is not None and max(map(len, values)) <= MAX_MESSAGE_BYTES:
            decoded = route.batch(values)
            if None not in decoded:
                try:
                    return [row(ev) for ev in decoded]
                except DecodeError:  # AttributeError among them: a row function using
                    pass  # something only the pydantic model has (a property, a method)
        out: list[tuple] = []
        for msg, raw, struct in zip(group, values, decoded, strict=True):
            try:
                if struct is None:
                    raise ValueError("slow path")
                out.append(row(struct))
            except DecodeError:
                ev = self._decode_or_reject(msg, route, raw, out)
                if ev is not None:
                    out.append(row(ev))
        return out

    def _store(self, batch: _Batch, stop: threading.Event) -> bool:
        """Steps 3-5 on the insert thread: insert, then flush and commit at once (False:
        stopped during an outage, nothing committed)."""
        if not self._insert(batch.rows, stop):
            return False
        self._commit(batch)
        return True

    def _commit(self, batch: _Batch) -> None:
        """Steps 4-5, after the batch's rows are in ClickHouse."""
        self.producer.flush(30)
        offsets = [TopicPartition(t, p, o + 1) for (t, p), o in batch.offsets.items()]
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # e.g. the partitions were revoked: the new owner redoes them
            self.stats.commit_failures += 1
            event(log, "commit_failed", logging.WARNING, error=str(exc)[:500], partitions=len(offsets))
            return
        self.stats.batches += 1
        self.stats.messages += batch.count
        self.stats.last_commit_ts = time.time()

    def _add_route(self, full_name: str) -> _Route:
        topic = topic_for_name(full_name, self.prefix)
        fast = counted_decoder(topic.event) or fast_decoder(topic.event)
        batch = counted_batch_decoder(topic.event) or (None if fast is None else _one_by_one(fast))
        route = _Route(topic, topic.event, SPECS[topic.name], fast, batch)
        self._routes[full_name] = route
        return route

    def _ok(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if is_fatal(err):
            self._fatal = True
        event(log, "consume_error", logging.WARNING, error=str(err))
        return False

    def _decode_or_reject(self, msg: Message, route: _Route, raw: bytes, rows: list[tuple]) -> Event | None:
        """The slow path: `codec.decode` (the reference), dead-lettering what it rejects
        (an invalid message on dlq.v1 itself: its letter's row goes into `rows`)."""
        topic = route.topic
        self.stats.slow_path += 1
        try:
            return decode(route.model, raw)
        except InvalidEvent as err:
            letter = dead_letter(
                err,
                source_topic=msg.topic(),
                rejected_by=REJECTED_BY,
                key=msg.key(),
                partition=msg.partition(),
                offset=msg.offset(),
            )
            self.stats.dead_letters += 1
            event(log, "dead_letter", logging.WARNING, topic=msg.topic(), offset=msg.offset(), reason=letter.reason)
            if topic is DLQ:
                rows.append(route.spec.row(letter))
            else:
                self.producer.produce(DLQ.full_name(self.prefix), encode(letter), key_of(letter, DLQ.key))
            return None

    def _insert(self, rows: dict[str, list[tuple]], stop: threading.Event | None) -> bool:
        backoff = self.settings.sink_retry_initial_s
        pending = dict(rows)
        while pending:
            table, batch = next(iter(pending.items()))
            try:
                with gc_paused():
                    self._insert_table(table, batch)
                self.stats.rows[table] += len(batch)
                del pending[table]
                backoff = self.settings.sink_retry_initial_s
            except Exception as exc:  # ClickHouse down or refusing: retry, never drop
                self.stats.insert_failures += 1
                event(
                    log,
                    "insert_failed",
                    logging.WARNING,
                    table=table,
                    rows=len(batch),
                    error=str(exc)[:500],
                    retry_in_s=backoff,
                )
                if stop is not None and stop.wait(backoff):
                    return False
                if stop is None:
                    time.sleep(backoff)
                backoff = min(backoff * 2, self.settings.sink_retry_max_s)
        return True

    def _insert_table(self, table: str, batch: list[tuple]) -> None:
        """One insert of a table's rows: one JSON document of columns (`rows.json_columns`),
        which ClickHouse parses in C++; chdb releases the GIL meanwhile, so the next
        batch is decoded while this one is parsed."""
        spec = self._specs[table]
        body = json_columns(spec, batch)
        self.client.raw_insert(table, spec.columns, insert_block=body, fmt=INSERT_FORMAT, settings=INSERT_SETTINGS)
