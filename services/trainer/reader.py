"""Reading samples.v1 into batches, at offsets the trainer's checkpoint chose.

The consumer is assigned every partition by hand and seeks to the checkpointed offsets;
nothing is ever committed to the consumer group, because the offsets that count are the
ones saved with the weights. Invalid messages go to dlq.v1 and are counted.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, Producer, TopicPartition

from schemas.codec import InvalidEvent, dead_letter, decode, encode, key_of
from schemas.events import SampleEvent
from schemas.topics import DLQ, SAMPLES
from services.kafka.idle import EndPauses
from services.kafka.producers import producer_config
from services.kafka.security import librdkafka_config
from services.logs import event
from services.trainer.batching import Batch, collate, is_heldout, too_stale
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


class SampleReader:
    """Consumes samples.v1 from given offsets and cuts it into batches.

    `next_batch` is the synchronous path; `start` runs it in a thread that keeps up to
    `prefetch` collated (and prepared) batches ready in `ready` (the pipelined path)."""

    def __init__(
        self,
        settings: TrainerSettings,
        bootstrap: str,
        offsets: dict[int, int],
        *,
        current_version: Callable[[], int],
        pad_id: int,
        prefetch: int = 2,
        prepare: Callable[[Batch], None] | None = None,
    ) -> None:
        self.settings = settings
        self.prepare = prepare
        """Run on every collated batch before it is handed out (the reference's logprobs):
        on the reader thread when pipelined, inline in `next_batch` otherwise."""
        self.topic = SAMPLES.full_name(settings.topic_prefix)
        self.dlq_topic = DLQ.full_name(settings.topic_prefix)
        self.current_version = current_version
        self.pad_id = pad_id
        self.consumer = Consumer(
            {
                **librdkafka_config(bootstrap, settings),
                "group.id": f"{settings.topic_prefix}{settings.trainer_group_id}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "enable.partition.eof": True,  # for EndPauses
                "fetch.wait.max.ms": 100,
            }
        )
        self.pauses = EndPauses(self.consumer, settings.kafka_idle_pause_ms)
        self.producer = Producer({**producer_config(bootstrap, settings), "linger.ms": 50})
        meta = self.consumer.list_topics(self.topic, timeout=30)
        parts = meta.topics[self.topic].partitions if self.topic in meta.topics else {}
        if not parts:
            raise RuntimeError(f"topic {self.topic} does not exist; run `rlfeed up` or `rlfeed topics`")
        default = OFFSET_BEGINNING if settings.trainer_start_from == "earliest" else OFFSET_END
        self.position: dict[int, int] = dict(offsets)
        self.consumer.assign([TopicPartition(self.topic, p, offsets.get(p, default)) for p in sorted(parts)])
        self.ready: queue.Queue[Batch] = queue.Queue(maxsize=max(1, prefetch))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.timings: dict[str, float] = dict.fromkeys(
            ("consume_s", "decode_s", "collate_s", "prepare_s", "handoff_s", "stage_cpu_s", "prepare_cpu_s"), 0.0
        )
        """Seconds per stage (wall): `consume_s` in the client's consume (waiting for the
        stream included), `decode_s` decoding and routing messages, `collate_s` padding,
        `prepare_s` the `prepare` callback, `handoff_s` the read-ahead thread blocked on a
        full queue (it is ahead of the optimiser); CPU seconds of the thread that ran them:
        `stage_cpu_s` all of a batch's reading and preparing, `prepare_cpu_s` the callback."""

    def next_batch(self, stop: threading.Event | None = None) -> Batch | None:
        """Read until a batch is full, or `trainer_batch_wait_s` passed since its first
        message; None when nothing arrived before `stop` or the wait ran out."""
        s = self.settings
        batch = Batch()
        first_at: float | None = None
        give_up = time.monotonic() + s.trainer_batch_wait_s
        consume_s = 0.0  # counted only for a batch that got messages (not idle polling)
        cpu0 = time.thread_time()
        while len(batch.samples) < s.trainer_batch_size:
            now = time.monotonic()
            deadline = first_at + s.trainer_batch_wait_s if first_at is not None else give_up
            if now >= deadline or (stop is not None and stop.is_set()):
                break
            msgs = self.pauses.consume(s.trainer_batch_size - len(batch.samples), min(0.2, deadline - now))
            t0 = time.monotonic()
            consume_s += t0 - now
            for msg in msgs:
                err = msg.error()
                if err is not None:
                    event(log, "consume_error", logging.WARNING, error=str(err))
                    continue
                if first_at is None:
                    first_at = time.monotonic()
                self._take(batch, msg)
            self.timings["decode_s"] += time.monotonic() - t0
        if not batch.messages:
            return None
        self.timings["consume_s"] += consume_s
        batch.offsets_after = dict(self.position)
        if batch.samples:
            t0 = time.monotonic()
            batch.collated = collate(batch.samples, s.max_seq_tokens, self.pad_id)
            t1 = time.monotonic()
            self.timings["collate_s"] += t1 - t0
            if self.prepare is not None:
                c1 = time.thread_time()
                self.prepare(batch)
                self.timings["prepare_s"] += time.monotonic() - t1
                self.timings["prepare_cpu_s"] += time.thread_time() - c1
        self.timings["stage_cpu_s"] += time.thread_time() - cpu0
        return batch

    def _take(self, batch: Batch, msg) -> None:
        s = self.settings
        p, off = msg.partition(), msg.offset()
        lo, _ = batch.ranges.get(p, (off, off))
        batch.ranges[p] = (lo, off + 1)
        self.position[p] = off + 1
        batch.messages += 1
        try:
            sample = decode(SampleEvent, msg.value() or b"")
        except InvalidEvent as exc:
            batch.drop("invalid")
            dl = dead_letter(
                exc, source_topic=self.topic, rejected_by="trainer", key=msg.key(), partition=p, offset=off
            )
            self.producer.produce(self.dlq_topic, encode(dl), key=key_of(dl, DLQ.key))
            self.producer.poll(0)
            return
        if sample.model != s.model_name:
            batch.drop("other_model")
        elif not sample.completion_token_ids:
            batch.drop("empty")
        elif is_heldout(sample.generation_id, s.heldout_every):
            batch.heldout.append(sample)
        elif too_stale(sample.policy_version, self.current_version(), s.max_staleness_versions):
            batch.drop("stale")
        else:
            batch.samples.append(sample)

    # --- pipelined mode ---
    def start(self) -> None:
        """Read ahead in a background thread into `ready`."""
        self._thread = threading.Thread(target=self._run, name="sample-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # OpenMP's thread count is per thread: give this one the trainer's, not the default.
        torch.set_num_threads(self.settings.trainer_torch_threads)
        try:
            while not self._stop.is_set():
                batch = self.next_batch(self._stop)
                if batch is None:
                    continue
                t0 = time.monotonic()
                while not self._stop.is_set():
                    try:
                        self.ready.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                self.timings["handoff_s"] += time.monotonic() - t0
        except BaseException as exc:  # surfaced to the trainer thread
            self.error = exc
            event(log, "reader_failed", logging.ERROR, error=repr(exc))

    def get(self, timeout_s: float) -> Batch | None:
        """The next prefetched batch, or None after `timeout_s`."""
        if self.error is not None:
            raise RuntimeError("sample reader failed") from self.error
        try:
            return self.ready.get(timeout=timeout_s)
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop the thread (read-ahead batches are discarded: the checkpoint's offsets
        predate them, so they are read again after a restart), close the clients."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.producer.flush(10)
        self.consumer.close()
