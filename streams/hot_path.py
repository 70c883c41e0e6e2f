"""The high-rate join: a confluent-kafka consumer and producer, run as a Faust `Service`.

`HotPath` is the synchronous core (one batch per `run_once`); `JoinService` runs it in
one dedicated thread so that librdkafka's blocking calls stay off the event loop.

The order of one batch, and why a crash anywhere in it loses nothing:

1. Consume up to `batch_max_messages` from generations.v1 and feedback.v1 (partition p
   of both topics is owned by the same worker: range assignment, co-partitioned topics).
2. State: `streams.join.process_batch` updates the per-partition dicts and returns the
   samples, dead letters and changelog records (final value per changed key).
3. Produce the samples, the preferences mined from them and the dead letters, then
   queue the changelog records behind them: one batched produce, flushed in two steps
   (4 and 5). Generations waiting for feedback are handed to the reward-model scorer
   (a queue put that never blocks; the scorer thread fills the scores the join reads).
4. Flush the samples and dead letters (acks=all; a delivery error stops the worker).
5. Flush the changelog records.
6. Commit the batch's offsets (synchronously). A failed commit (the group moved on, e.g.
   after a broker restart) is logged and counted, not fatal: 2-5 are done, so the batch is
   redelivered and replayed like after a crash. A consumer that reports a fatal error
   (a static member fenced after a broker restart) is replaced the same way.

A crash before 6 replays the batch from the last committed offsets on the next owner,
over the state restored from the changelog. Samples are deterministic (same sample id
for the same generation, reason and feedback), so a replay re-emits at most samples
whose ids were already written, which consumers drop. Samples are acknowledged before
the changelog that records them as settled: were it the other way round, a crash
between the two would leave a key settled in the restored state with its sample never
delivered, and the replay would treat its feedback as duplicates (a lost sample).
On assignment, each new partition's state is rebuilt from its changelog partition
before the first batch; on revocation the producer is flushed and nothing is left
uncommitted (rebalances happen only inside step 1, after step 6 of the previous batch).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import logging
import time
from collections import Counter
from typing import Any

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from mode import Service

from schemas.codec import MAX_MESSAGE_BYTES
from schemas.topics import DLQ, FEEDBACK, GENERATIONS, JOIN_PARTITIONS, PREFERENCES, SAMPLES
from services import logs
from services.kafka.errors import is_fatal
from services.kafka.idle import EndPauses
from services.kafka.producers import producer_config
from services.kafka.security import librdkafka_config
from services.preferences.mining import PairState
from services.preferences.scoring import BackgroundScorer, load_published
from streams.changelog import changelog_topic, read_partitions, restore
from streams.forget import SamplePrivacy
from streams.join import FB, GEN, BatchOutput, JoinConfig, PartitionState, Record, process_batch
from streams.settings import StreamsSettings

log = logging.getLogger(__name__)


GC_THRESHOLDS = (50_000, 20, 10)
"""The cyclic garbage collector's thresholds in a worker process (Python's default is
(700, 10, 10)). The join allocates several containers per event and keeps tens of
thousands of entries alive; with the default thresholds the collector ran ~640 times per
100k events and took ~30% of the join's CPU (bench/streams.py, py-spy). The join creates
no reference cycles, so rarer young collections lose nothing."""


def tune_gc() -> None:
    """Collect once, move everything alive now (imports, settings) out of the collector's
    sight (`gc.freeze`), and make collections rarer (`GC_THRESHOLDS`). For the worker
    process (`rlfeed streams`) and the benchmark, before the first batch."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def wall_ms() -> int:
    """The wall clock in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def prefetch_config(settings: StreamsSettings) -> dict[str, int]:
    """Consumer settings that keep librdkafka's fetcher a few batches ahead, not 100k
    messages (its default): a fetcher that has caught up with the log sends fetch after
    fetch, and a broker that answers empty fetches at once instead of holding them for
    `fetch.wait.max.ms` (the embedded noida-db) keeps its thread and the broker busy.
    Bounded, the fetcher waits while the join works through the queue (bench/streams.py:
    the consumer's broker thread used about half the CPU it did with the defaults)."""
    return {
        "queued.min.messages": settings.prefetch_batches * settings.batch_max_messages,
        "fetch.queue.backoff.ms": settings.fetch_queue_backoff_ms,
    }


def reward_scorer(settings: StreamsSettings) -> BackgroundScorer:
    """The reward-model scorer the settings ask for (started; it loads the latest version)."""
    store = settings.checkpoint_dir or settings.home_dir / "checkpoints"
    batch, threads = settings.reward_model_batch_size, settings.reward_model_torch_threads

    def loader(version: int | None) -> Any:
        return load_published(store, settings.reward_model_name, version, torch_threads=threads, batch_size=batch)

    return BackgroundScorer(
        loader,
        batch_size=batch,
        queue_max=settings.reward_model_queue_max,
        max_scores=settings.reward_model_max_scores,
        linger_s=settings.reward_model_linger_s,
    ).start()


def mine_preferences(pairs: PairState, out: BatchOutput) -> list[tuple[int, bytes, bytes]]:
    """(partition, key, value) of the preferences mined from a batch's settled generations;
    one too large for a message is counted in `out.counts` and left out."""
    records = []
    for p, outcome in out.outcomes:
        for mined in pairs.observe(outcome):
            value = orjson.dumps(mined.to_event())
            if len(value) > MAX_MESSAGE_BYTES:
                out.counts["preferences_too_large"] += 1
                continue
            records.append((p, mined.generation_id.encode(), value))
    out.counts["preferences"] += len(records)
    return records


class HotPath:
    """One worker's join consumer, producer and per-partition state."""

    def __init__(self, settings: StreamsSettings, bootstrap: str, partitions: int = JOIN_PARTITIONS) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        prefix = settings.topic_prefix
        self.cfg = JoinConfig.from_settings(settings, partitions)
        self.preferences_topic = PREFERENCES.full_name(prefix)
        self.pairs = (
            PairState(
                window_ms=int(settings.preference_pair_window_s * 1000),
                max_keys=settings.preference_max_keys,
                max_per_key=settings.preference_max_per_key,
            )
            if settings.preferences_enabled
            else None
        )
        self.scorer = reward_scorer(settings) if settings.reward_model_enabled else None
        # forgotten users' samples dropped, sample text redacted (streams/forget.py)
        self.privacy = SamplePrivacy.start(bootstrap, prefix)
        if self.scorer is not None:
            self.cfg = dataclasses.replace(self.cfg, model_scores=self.scorer.scores)
        self.gen_topic = GENERATIONS.full_name(prefix)
        self.fb_topic = FEEDBACK.full_name(prefix)
        self.samples_topic = SAMPLES.full_name(prefix)
        self.dlq_topic = DLQ.full_name(prefix)
        self.changelog_topic = changelog_topic(prefix)
        self.states: dict[int, PartitionState] = {}
        self.stats: Counter[str] = Counter()
        self.last_commit_ts = 0.0
        self._last_tick = 0.0
        self._delivery_errors: list[str] = []
        self.closed = False
        consumer_config = {
            **librdkafka_config(bootstrap, settings),
            "group.id": settings.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,  # for EndPauses
            # range keeps partition p of both co-partitioned topics on one member
            "partition.assignment.strategy": "range",
            "session.timeout.ms": int(settings.session_timeout_s * 1000),
            "max.poll.interval.ms": int(settings.max_poll_interval_s * 1000),
            **prefetch_config(settings),
        }
        if settings.group_instance_id:
            consumer_config["group.instance.id"] = settings.group_instance_id
        self._consumer_config = consumer_config
        self.consumer = self._new_consumer()
        self.producer = Producer(
            {
                **producer_config(bootstrap, settings),
                "acks": "all",
                "linger.ms": 5,
                "batch.size": 1_000_000,
                "queue.buffering.max.messages": 1_000_000,
                "queue.buffering.max.kbytes": 1_048_576,
                "delivery.report.only.error": True,
                "on_delivery": self._on_delivery,
            }
        )

    def _new_consumer(self) -> Consumer:
        """A consumer in the worker's group, subscribed to generations and feedback."""
        consumer = Consumer(self._consumer_config)
        consumer.subscribe(
            [self.gen_topic, self.fb_topic], on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )
        self.pauses = EndPauses(consumer, self.settings.kafka_idle_pause_ms)
        return consumer

    def _renew_consumer(self, err: KafkaError) -> None:
        """Replace a consumer that hit a fatal error (e.g. a static member fenced after a
        broker restart), as after a kill -9: its partitions' state is dropped and restored
        from the changelog when they are assigned again, and what it had not committed is
        redelivered (the same sample ids, dropped downstream as duplicates)."""
        logs.event(log, "streams.consumer_renewed", level=logging.WARNING, error=str(err))
        self.producer.flush(self.settings.flush_timeout_s)
        with contextlib.suppress(Exception):
            self.consumer.close()
        self.states.clear()
        self.stats["consumer_renewals"] += 1
        self.consumer = self._new_consumer()

    # --- rebalance callbacks (they run inside consume(), between batches) ---

    def _on_assign(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        new = sorted({tp.partition for tp in tps} - set(self.states))
        started = time.monotonic()
        records = read_partitions(self.bootstrap, self.changelog_topic, new, self.settings.restore_timeout_s)
        now = wall_ms()
        for p in new:
            self.states[p] = restore(p, records[p], self.cfg, now)
        logs.event(
            log,
            "streams.assigned",
            partitions=sorted(self.states),
            restored={str(p): len(self.states[p].pending) + len(self.states[p].settled) for p in new},
            changelog_records=sum(len(r) for r in records.values()),
            restore_s=round(time.monotonic() - started, 3),
        )

    def _on_revoke(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        remaining = self.producer.flush(self.settings.flush_timeout_s)
        gone = {tp.partition for tp in tps}
        for p in gone:
            self.states.pop(p, None)
        logs.event(log, "streams.revoked", partitions=sorted(gone), unflushed=remaining)

    def _on_lost(self, consumer: Consumer, tps: list[TopicPartition]) -> None:
        for p in {tp.partition for tp in tps}:
            self.states.pop(p, None)
        logs.event(log, "streams.lost", level=logging.WARNING, partitions=sorted({tp.partition for tp in tps}))

    def _on_delivery(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            self._delivery_errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    # --- one batch ---

    def run_once(self) -> int:
        """Consume, join, produce, flush and commit one batch; return its message count."""
        s = self.settings
        if self.closed:
            return 0
        msgs = self.pauses.consume(s.batch_max_messages, s.batch_timeout_s)
        now_s = time.monotonic()
        if not msgs and now_s - self._last_tick < s.tick_interval_s:
            return 0
        self._last_tick = now_s
        records = []
        offsets: dict[tuple[str, int], int] = {}
        gen_topic = self.gen_topic
        for m in msgs:
            if m.error() is not None:
                if is_fatal(m.error()):
                    self._renew_consumer(m.error())
                    return 0  # nothing of this batch is processed or committed: redelivered
                logs.event(log, "streams.consume_error", level=logging.WARNING, error=str(m.error()))
                continue
            topic, p, offset = m.topic(), m.partition(), m.offset()
            records.append(Record(GEN if topic == gen_topic else FB, p, offset, m.key(), m.value()))
            offsets[(topic, p)] = offset
        # 2. state
        out = process_batch(self.states, records, wall_ms(), self.cfg)
        self.privacy.apply(out)
        if self.scorer is not None:
            for gen in out.to_score:
                self.scorer.submit(gen.generation_id, gen.prompt, gen.completion)
        preferences = mine_preferences(self.pairs, out) if self.pairs is not None else []
        # 3. produce: samples, preferences and dead letters, then the changelog
        self._produce_all(self.samples_topic, out.samples)
        self._produce_all(self.preferences_topic, preferences)
        for key, value in out.dead_letters:
            self._produce(self.dlq_topic, value, key, None)
        # 4. flush them before the changelog can say "settled"
        if out.samples or preferences or out.dead_letters:
            self._flush()
        # 5. the changelog, flushed
        self._produce_all(self.changelog_topic, out.changelog)
        if out.changelog:
            self._flush()
        # 6. commit
        if offsets:
            commit = [TopicPartition(t, p, o + 1) for (t, p), o in offsets.items()]
            try:
                self.consumer.commit(offsets=commit, asynchronous=False)
                self.last_commit_ts = time.time()
            except KafkaException as exc:
                # e.g. ILLEGAL_GENERATION after a broker restart: everything is flushed, so
                # the batch is simply redelivered (same sample ids) once the group settles.
                self.stats["commit_failures"] += 1
                logs.event(
                    log, "streams.commit_failed", level=logging.WARNING, error=str(exc)[:500], partitions=len(commit)
                )
        self.stats.update(out.counts)
        self.stats["batches"] += 1
        self.stats["produced"] += len(out.samples) + len(out.dead_letters) + len(out.changelog)
        return len(msgs)

    def _flush(self) -> None:
        remaining = self.producer.flush(self.settings.flush_timeout_s)
        if remaining:
            raise RuntimeError(
                f"{remaining} messages not delivered within flush_timeout_s={self.settings.flush_timeout_s}"
            )
        if self._delivery_errors:
            raise RuntimeError(f"delivery failed: {self._delivery_errors[:5]}")

    def _produce_all(self, topic: str, records: list[tuple[int, bytes, bytes | None]]) -> None:
        """Queue (partition, key, value) records; one Python call per record only when the
        producer's queue is full."""
        produce = self.producer.produce
        for p, key, value in records:
            try:
                produce(topic, value, key, p)
            except BufferError:
                self._produce(topic, value, key, p)

    def _produce(self, topic: str, value: bytes | None, key: bytes | None, partition: int | None) -> None:
        while True:
            try:
                if partition is None:
                    self.producer.produce(topic, value, key)
                else:
                    self.producer.produce(topic, value, key, partition)
                return
            except BufferError:
                self.producer.poll(0.05)

    def status(self) -> dict[str, Any]:
        """Counters and state sizes for the web view and the status log."""
        return {
            "partitions": sorted(self.states),
            "pending": sum(len(st.pending) for st in self.states.values()),
            "settled_remembered": sum(len(st.settled) for st in self.states.values()),
            "last_commit_ts": self.last_commit_ts,
            **self.stats,
            **(self.pairs.status() if self.pairs is not None else {}),
            **(self.scorer.status() if self.scorer is not None else {}),
            **self.privacy.status(),
        }

    def close(self) -> None:
        """Flush, then leave the group (the revoke callback runs inside close)."""
        if self.closed:
            return
        self.closed = True
        if self.scorer is not None:
            self.scorer.stop()
        self.privacy.stop()
        self.producer.flush(self.settings.flush_timeout_s)
        self.consumer.close()


class JoinService(Service):
    """Runs `HotPath` batches in one dedicated thread until the app stops."""

    def __init__(self, settings: StreamsSettings, bootstrap: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.bootstrap = bootstrap
        self.core: HotPath | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rlfeed-join")

    async def _call(self, fn: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def follow_model_update(self, model: str, version: int) -> None:
        """A new version on model-updates.v1: the reward-model scorer loads it when it is its model."""
        scorer = self.core.scorer if self.core is not None else None
        if scorer is not None and model == self.settings.reward_model_name:
            scorer.want(version)

    async def on_start(self) -> None:
        self.core = await self._call(lambda: HotPath(self.settings, self.bootstrap))
        logs.event(log, "streams.join_started", group_id=self.settings.group_id)

    @Service.task
    async def _run(self) -> None:
        assert self.core is not None
        run_once = self.core.run_once
        while not self.should_stop:
            try:
                await self._call(run_once)
            except Exception as exc:
                logs.event(log, "streams.join_failed", level=logging.ERROR, error=repr(exc))
                await self.crash(exc)
                return

    async def on_stop(self) -> None:
        if self.core is not None:
            await self._call(self.core.close)
            logs.event(log, "streams.join_stopped", **self.core.status())
        self._executor.shutdown(wait=False)
