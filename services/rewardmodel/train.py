"""`rlfeed rewardmodel train`: retrain the reward model from preferences.v1 on a cadence.

The loop, in order:
1. read preferences.v1 (every partition, from the beginning: the topic is the training
   set, so a restarted trainer rebuilds its buffer from it; no offsets are committed)
   into a bounded buffer, deduplicated by event id;
2. when `rm_train_interval_s` has passed and `rm_min_new_preferences` arrived: split by
   prompt (held-out prompts are never trained on), fit a fresh head on the training
   part (frozen backbone: embeddings are cached across retrainings);
3. evaluate on the held-out part: pairwise AUROC, Brier, ECE, unpaired AUROC;
4. gate: publish only with `rm_min_heldout_pairs` held-out pairs and AUROC at least
   `rm_min_heldout_auroc`;
5. publish: checkpoint store (artifact, then manifest), then the ModelUpdateEvent on
   model-updates.v1 with the figures in `eval_metrics` (the sink stores them in
   ClickHouse's model_updates table).
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from schemas.codec import InvalidEvent, decode, encode, key_of
from schemas.events import ModelUpdateEvent, PreferenceEvent
from schemas.topics import MODEL_UPDATES, PREFERENCES
from services.kafka.idle import EndPauses
from services.kafka.producers import producer_config
from services.kafka.security import librdkafka_config
from services.logs import event
from services.rewardmodel.data import PreferenceBuffer, split
from services.rewardmodel.settings import RewardModelSettings

log = logging.getLogger(__name__)


def gate(figures: dict[str, float], s: RewardModelSettings) -> list[str]:
    """The publishing bounds a candidate's held-out figures break (empty: publish)."""
    failures = []
    pairs = figures.get("heldout_pairs", 0.0)
    if pairs < s.rm_min_heldout_pairs:
        failures.append(f"heldout_pairs {pairs:.0f} < {s.rm_min_heldout_pairs}")
    area = figures.get("heldout_auroc")
    if area is not None and area < s.rm_min_heldout_auroc:
        failures.append(f"heldout_auroc {area:.4f} < {s.rm_min_heldout_auroc}")
    return failures


class RewardModelTrainer:
    """Buffer, cadence, fit, evaluate, gate, publish (see the module docstring)."""

    def __init__(self, s: RewardModelSettings, bootstrap: str) -> None:
        import torch

        from services.checkpoints.store import CheckpointStore
        from services.preferences.model import EmbeddingCache, RewardModel

        torch.set_num_threads(s.rm_torch_threads)
        self.s = s
        self.store = CheckpointStore(s.store_dir)
        self.buffer = PreferenceBuffer(s.rm_max_preferences)
        self.make_model = lambda: RewardModel(finetune_layers=s.rm_finetune_layers, max_seq_tokens=s.rm_max_seq_tokens)
        self.model = self.make_model()
        self.cache = EmbeddingCache(self.model, s.rm_batch_size)
        self.topic = PREFERENCES.full_name(s.topic_prefix)
        self.consumer = Consumer(
            {
                **librdkafka_config(bootstrap, s),
                "group.id": f"rlfeed-rewardmodel-{s.reward_model_name}",
                "enable.auto.commit": False,
                "enable.partition.eof": True,  # for EndPauses
            }
        )
        self.consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(PREFERENCES.partitions)])
        self.pauses = EndPauses(self.consumer, s.kafka_idle_pause_ms)
        self.producer = Producer({**producer_config(bootstrap, s), "acks": "all"})
        self.invalid = 0
        self.last_train = 0.0

    def poll(self, timeout_s: float = 1.0) -> int:
        """Read what is there into the buffer; return the number of new preferences."""
        added = 0
        for m in self.pauses.consume(1000, timeout_s):
            if m.error() is not None:
                continue
            try:
                added += self.buffer.add(decode(PreferenceEvent, m.value()))
            except InvalidEvent:
                self.invalid += 1
        return added

    def due(self, now: float) -> bool:
        """Whether a retraining is due (cadence and new data)."""
        return now - self.last_train >= self.s.rm_train_interval_s and (
            self.buffer.added_since_train >= self.s.rm_min_new_preferences
        )

    def train_once(self) -> ModelUpdateEvent | None:
        """Fit, evaluate, gate and publish one version; None when not published."""
        from services.preferences.model import TrainConfig, evaluate, train

        s = self.s
        started = time.monotonic()
        self.last_train = time.monotonic()
        self.buffer.added_since_train = 0
        (tr_pairs, tr_unpaired), (ho_pairs, ho_unpaired) = split(list(self.buffer.items.values()), s.rm_heldout_pct)
        if len(tr_pairs) < s.rm_min_train_pairs:
            event(log, "rewardmodel.skipped", reason="too few training pairs", train_pairs=len(tr_pairs))
            return None
        self.model = self.make_model()
        self.cache.model = self.model
        if s.rm_finetune_layers == 0:
            keep = {(x.prompt, t) for x in tr_pairs + ho_pairs for t in (x.chosen, x.rejected)}
            keep |= {(x.prompt, x.completion) for x in tr_unpaired + ho_unpaired}
            self.cache.cache = {k: v for k, v in self.cache.cache.items() if k in keep}
        cfg = TrainConfig(epochs=s.rm_epochs, lr=s.rm_lr, batch_size=s.rm_batch_size)
        figures = train(self.model, tr_pairs, tr_unpaired, cfg, self.cache)
        figures.update(evaluate(self.model, ho_pairs, ho_unpaired, self.cache))
        figures["train_s"] = time.monotonic() - started
        failures = gate(figures, s)
        if failures:
            event(log, "rewardmodel.refused", failures=failures, **figures)
            return None
        latest = self.store.latest_version(s.reward_model_name)
        version = 0 if latest is None else latest + 1
        update = self.store.publish(
            s.reward_model_name,
            version,
            self.model.trainable_state(),
            parent_version=latest,
            full=True,
            eval_metrics=figures,
        )
        self.producer.produce(
            MODEL_UPDATES.full_name(s.topic_prefix), encode(update), key_of(update, MODEL_UPDATES.key)
        )
        if self.producer.flush(30) != 0:
            raise RuntimeError("model update not delivered within 30 s")
        event(log, "rewardmodel.published", model=s.reward_model_name, version=version, **figures)
        return update

    def run(self, stop: threading.Event) -> None:
        """Poll and retrain until `stop` is set."""
        event(log, "rewardmodel.started", model=self.s.reward_model_name, topic=self.topic)
        while not stop.is_set():
            self.poll()
            if self.due(time.monotonic()):
                self.train_once()

    def close(self) -> None:
        """Flush and close the Kafka clients."""
        self.producer.flush(10)
        self.consumer.close()
