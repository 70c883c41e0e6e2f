"""The training loop, top to bottom.

Start:
1. load version 0 (the base model directory); publish it to the store as a full
   snapshot if the store has no version of this model yet (not gated);
2. restore the newest checkpoint (weights, optimiser, offsets, counters), if any;
3. assign samples.v1 at the checkpointed offsets (earliest/latest for unseen partitions).

Each step, in this order:
1. take the next batch (prefetched and collated by the reader thread when pipelined);
2. drop samples that went stale while queued; keep held-out samples for the gate;
3. advantages (group-relative, else the running baseline); samples with advantage 0 are
   not forwarded; forward/backward in micro-batches, clip, AdamW step;
4. record the batch's offsets as consumed (and append it to the step ledger);
5. checkpoint when due (weights + optimiser + offsets together, atomically);
6. publish when due: the step's weights are copied and handed to the publisher thread,
   which gates them -> writes the store (artifact, then manifest) -> produces on
   model-updates.v1, while the optimiser goes on stepping; at the first step boundary
   after it is done, the new version becomes the parent of the next one and a checkpoint
   remembers it. A trainer killed in between restarts on the newest stored version (see
   Start), as if the checkpoint had been written. One publish is in flight at most; a
   rollback, a stop, or `publish()` waits for it first.
Between steps: follow a rollback (services.trainer.lineage) by reloading the version now
served, with a fresh optimiser, and publishing its children from then on.

The pipeline stage (the reader's thread when `pipelined`, inline otherwise) decodes,
batches, pads, and computes the frozen reference's logprobs for the KL term (forward
only, skipping rows that cannot get a nonzero advantage), so the optimiser's thread only
runs the policy's forward/backward and the AdamW step.
Stop (SIGINT/SIGTERM): finish the current step, checkpoint, close.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import torch
from confluent_kafka import Producer

from schemas.codec import decode, encode, key_of
from schemas.events import ModelUpdateEvent, RolloutEvent, SampleEvent
from schemas.topics import MODEL_UPDATES, SAMPLES
from services.checkpoints.store import CheckpointStore
from services.kafka.producers import producer_config
from services.logs import event
from services.trainer import distributed, gate, lineage, losses, policy, state
from services.trainer.batching import Batch, may_train, prompt_key, shortest_first, too_stale
from services.trainer.reader import SampleReader
from services.trainer.settings import TrainerSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PublishJob:
    """What the publisher thread gates and publishes: a copy of the weights at a step boundary."""

    weights: dict[str, torch.Tensor]
    parent_version: int
    heldout: list[SampleEvent]
    step: int


@dataclass(frozen=True)
class PublishOutcome:
    """A publish attempt's result: the event (None: the gate refused), figures, duration."""

    job: PublishJob
    event: ModelUpdateEvent | None
    figures: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _ids(value: int | list[int] | None) -> set[int]:
    return set() if value is None else set(value) if isinstance(value, list) else {int(value)}


class Trainer:
    """One online trainer for one model. `run()` until `stop` is set."""

    def __init__(
        self,
        settings: TrainerSettings,
        bootstrap: str,
        stop: threading.Event | None = None,
        group: distributed.Group | None = None,
    ) -> None:
        s = self.settings = settings
        self.bootstrap = bootstrap
        self.stop = stop or threading.Event()
        self.group = group
        """The data-parallel group this trainer leads as rank 0 (None: one process)."""
        torch.set_num_threads(s.trainer_torch_threads)
        torch.manual_seed(s.seed)
        assert s.model_dir is not None and s.checkpoint_dir is not None and s.trainer_state_dir is not None
        self.store = CheckpointStore(s.checkpoint_dir)
        self.state_dir = state.model_state_dir(s.trainer_state_dir, s.model_name)
        self.topic = SAMPLES.full_name(s.topic_prefix)
        self.producer = Producer({**producer_config(bootstrap, s), "linger.ms": 5})

        # 1. version 0 and the frozen reference.
        self.device = policy.resolve_device(s.trainer_device, torch.cuda.is_available())
        self.bf16 = policy.use_bf16(s.trainer_bf16, self.device)
        self.model, self.tokenizer = policy.load(Path(s.model_dir))
        self.model.to(self.device)
        self.pad_id = policy.pad_id(self.tokenizer)
        self.eos_ids = _ids(self.tokenizer.eos_token_id) | _ids(self.model.generation_config.eos_token_id)
        if not self.store.has_version(s.model_name, 0):
            ev = self.store.publish(s.model_name, 0, policy.weights(self.model), parent_version=None, full=True)
            self._produce_update(ev)
            event(log, "published", model=s.model_name, version=0, kind="full", size_bytes=ev.size_bytes, gated=False)
        v0 = self.store.materialize(s.model_name, 0)
        policy.load_weights(self.model, v0)
        self.reference = policy.frozen_copy(self.model) if s.kl_coef > 0 else None
        self.model.train()
        self.optimizer = new_optimizer(self.model, s)

        # 2. resume.
        self.meta = state.TrainerMeta(topic=self.topic)
        if self.state_dir.is_dir():
            state.remove_leftovers(self.state_dir)
        ckpt = state.latest(self.state_dir)
        if ckpt is not None:
            meta, weights, optim = state.load(ckpt)
            policy.load_weights(self.model, weights)
            self.optimizer.load_state_dict(optim)
            if meta.topic != self.topic:
                event(log, "checkpoint_topic_mismatch", logging.WARNING, checkpoint_topic=meta.topic, topic=self.topic)
                meta.offsets = {}
                meta.topic = self.topic
            self.meta = meta
            event(
                log,
                "resumed",
                checkpoint=str(ckpt),
                step=meta.step,
                offsets={str(k): v for k, v in meta.offsets.items()},
                published_version=meta.published_version,
                pid=os.getpid(),
            )
        latest = self.store.latest_version(s.model_name) or 0
        latest_at = self.store.manifest(s.model_name, latest).event_time_ms
        if self.meta.lineage_since_ms <= latest_at:
            # Build on the newest version, unless this trainer followed a rollback after
            # it was published (then its checkpoint's parent stands).
            self.meta.published_version, self.meta.lineage_since_ms = latest, latest_at
        self.heldout: deque[SampleEvent] = deque(
            (SampleEvent.model_validate(x) for x in self.meta.heldout), maxlen=s.gate_heldout_samples
        )
        # Owned by the publisher thread while a publish is in flight (`_publishing`).
        self.parent: torch.nn.Module | None = None  # latest published weights, loaded on first publish
        self.parent_version: int | None = None
        self.candidate: torch.nn.Module | None = None  # the weights being gated
        self._publishing: Future[PublishOutcome] | None = None
        # (parent version, adopted at) before the last publish was adopted: a rollback
        # issued while that publish was in flight is judged against it (`_follow_rollbacks`).
        self._lineage_before_publish: tuple[int, int] | None = None
        self.last_checkpoint_at = time.monotonic()
        self.last_publish_at = time.monotonic()
        self._deferred_logged = False
        self.ledger = open(self.state_dir / "ledger.jsonl", "ab") if self._mkdir() else None  # noqa: SIM115

        if group is not None:
            distributed.sync_start(self.model, self.optimizer, self.reference, group)

        self.stats = {
            "steps": 0,
            "samples": 0,
            "optimizer_steps": 0,
            "wait_s": 0.0,
            "batch_wait_s": 0.0,
            "step_s": 0.0,
            "step_cpu_s": 0.0,
            "prepare_s": 0.0,
            "ref_rows": 0,
            "ref_rows_skipped": 0,
            "rollbacks_followed": 0,
            "publish_wait_s": 0.0,
        }
        # 3. rollbacks that happened while the trainer was away, then the stream.
        self.watcher = lineage.UpdateWatcher(s, bootstrap) if s.follow_rollbacks else None
        if self.watcher is not None:
            self._follow_rollbacks(self.watcher.catch_up())
        self.reader = SampleReader(
            s,
            bootstrap,
            self.meta.offsets,
            current_version=lambda: self.meta.published_version,
            pad_id=self.pad_id,
            prepare=self.prepare,
        )
        self.feedback_to_training_ms: deque[int] = deque(maxlen=s.trainer_latency_window)
        """Per trained sample: when its optimiser step began minus its first feedback's event time."""

    def _mkdir(self) -> bool:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        return True

    # --- the loop ---
    def run(self, max_steps: int | None = None, idle_exit_s: float | None = None) -> dict[str, float]:
        """Train until `stop` is set (or `max_steps` batches, or `idle_exit_s` without
        data: benchmarks and tests); checkpoint and close on the way out."""
        s = self.settings
        if s.pipelined:
            self.reader.start()
        idle_since = time.monotonic()
        started = time.monotonic()
        done_at: float | None = None  # when the previous step (and its checkpoint) ended
        try:
            while not self.stop.is_set():
                if self.watcher is not None:
                    self._follow_rollbacks(self.watcher.poll())
                t0 = time.monotonic()
                batch = self.reader.get(0.2) if s.pipelined else self.reader.next_batch(self.stop)
                self.stats["wait_s"] += time.monotonic() - t0
                if batch is None:
                    if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                        break
                    self._maybe_checkpoint_and_publish()
                    continue
                t1 = idle_since = time.monotonic()
                if done_at is not None:
                    # since the previous step: the optimiser waited for the pipeline
                    # (pipelined) or read and prepared this batch itself (synchronous)
                    self.stats["batch_wait_s"] += t1 - done_at
                self.stats.setdefault("first_batch_at", t1)
                c1 = time.thread_time()
                self.step(batch)
                self.stats["last_step_at"] = time.monotonic()
                self.stats["step_s"] += self.stats["last_step_at"] - t1
                self.stats["step_cpu_s"] += time.thread_time() - c1
                self._maybe_checkpoint_and_publish()
                done_at = time.monotonic()
                if max_steps is not None and self.stats["steps"] >= max_steps:
                    break
        finally:
            self._finish_publish_quietly()
            self.stats["elapsed_s"] = time.monotonic() - started
            self.stats.update({f"reader_{k}": v for k, v in self.reader.timings.items()})
            self.stats.update(latency_figures(self.feedback_to_training_ms, "feedback_to_training_ms"))
            self.stats.update(self.meta.counters)
            # Logged before the shutdown checkpoint: a large model's checkpoint can outlast
            # a supervisor's grace period, and the counters must not die with it.
            event(log, "trainer_stopped", **self.stats)
            self.reader.close()
            if self.watcher is not None:
                self.watcher.close()
            self.checkpoint("shutdown")
            if self.group is not None:
                distributed.broadcast_object(None, self.group)
            self.producer.flush(10)
            if self.ledger is not None:
                self.ledger.close()
        return self.stats

    def prepare(self, batch: Batch) -> None:
        """The pipeline stage's share of a step: the frozen reference's logprobs of the
        rows that may train (no gradient; micro-batches of `trainer_micro_batch_size`)."""
        col = batch.collated
        if self.reference is None or col is None:
            return
        t0 = time.monotonic()
        keep = may_train([x.reward for x in batch.samples], [prompt_key(x) for x in batch.samples])
        rows = [i for i, k in enumerate(keep) if k]
        rows = [rows[j] for j in shortest_first([int(n) for n in col.attention_mask[rows].sum(dim=1)])]
        ref = torch.zeros_like(col.sampler_logp)
        ready = torch.zeros(len(batch.samples), dtype=torch.bool)
        size = self.settings.trainer_micro_batch_size
        for lo in range(0, len(rows), size):
            idx = rows[lo : lo + size]
            part = col.rows(idx)
            with torch.no_grad(), policy.autocast(self.device, self.bf16):
                lp = policy.token_logprobs(self.reference, part.input_ids, part.attention_mask, part.completion_mask)
            ref[torch.tensor(idx), : lp.shape[1]] = lp.float()
            ready[torch.tensor(idx)] = True
        col.ref_logp, col.ref_ready = ref, ready
        self.stats["prepare_s"] += time.monotonic() - t0
        self.stats["ref_rows"] += len(rows)
        self.stats["ref_rows_skipped"] += len(keep) - len(rows)

    def step(self, batch: Batch) -> dict[str, float]:
        """Train on one batch and record its offsets as consumed."""
        s, m = self.settings, self.meta
        for reason, n in batch.dropped.items():
            m.counters[reason] = m.counters.get(reason, 0) + n
        if batch.heldout:
            self.heldout.extend(batch.heldout)
            m.counters["heldout"] = m.counters.get("heldout", 0) + len(batch.heldout)
        rows = [
            i
            for i, x in enumerate(batch.samples)
            if not too_stale(x.policy_version, m.published_version, s.max_staleness_versions)
        ]
        if len(rows) < len(batch.samples):
            m.counters["stale"] = m.counters.get("stale", 0) + len(batch.samples) - len(rows)
        samples = [batch.samples[i] for i in rows]
        now_ms = time.time_ns() // 1_000_000
        self.feedback_to_training_ms.extend(
            now_ms - x.first_feedback_ms for x in samples if x.first_feedback_ms is not None
        )
        adv, m.baseline = losses.advantages(
            [x.reward for x in samples], [prompt_key(x) for x in samples], m.baseline, s.baseline_decay
        )
        train_rows = [rows[j] for j, a in enumerate(adv) if abs(a) > 1e-8]
        train_adv = [a for a in adv if abs(a) > 1e-8]
        figures: dict[str, float] = {}
        if train_rows and batch.collated is not None:
            figures = self._optimise(batch, train_rows, train_adv)
        m.step += 1
        m.samples_trained += len(train_rows)
        m.steps_since_publish += 1
        m.samples_since_publish += len(train_rows)
        m.offsets.update(batch.offsets_after)
        self.stats["steps"] += 1
        self.stats["samples"] += len(batch.samples)
        if self.ledger is not None:
            line = {
                "step": m.step,
                "pid": os.getpid(),
                "trained": len(train_rows),
                "samples": len(batch.samples),
                "ranges": {str(p): list(r) for p, r in batch.ranges.items()},
            }
            self.ledger.write(orjson.dumps(line) + b"\n")
            self.ledger.flush()
        event(
            log,
            "step",
            logging.DEBUG,
            step=m.step,
            samples=len(batch.samples),
            trained=len(train_rows),
            dropped=batch.dropped,
            **figures,
        )
        return figures

    def _optimise(self, batch: Batch, rows: list[int], adv: list[float]) -> dict[str, float]:
        assert batch.collated is not None
        # Shortest first: each micro-batch then pads to a length close to its own rows'
        # (the loss is a mean over the step's tokens, so the order does not change it).
        order = shortest_first([int(n) for n in batch.collated.attention_mask[rows].sum(dim=1)])
        rows, adv = [rows[j] for j in order], [adv[j] for j in order]
        col = batch.collated.rows(rows)
        work = distributed.StepWork(col, torch.tensor(adv, dtype=torch.float32), max(col.n_tokens, 1))
        if self.group is not None:
            distributed.broadcast_object(work, self.group)
        totals = accumulate_gradients(self.model, self.reference, work, self.settings, self.group, self.bf16)
        totals["grad_norm"] = optimizer_step(self.model, self.optimizer, self.settings.grad_clip_norm, self.group)
        self.meta.optimizer_steps += 1
        self.stats["optimizer_steps"] += 1
        return totals

    # --- checkpoints and publishing ---
    def _maybe_checkpoint_and_publish(self) -> None:
        s, m = self.settings, self.meta
        self._finish_publish(block=False)
        now = time.monotonic()
        since_ckpt_steps = m.step - getattr(self, "_ckpt_step", -1)
        if since_ckpt_steps > 0 and (
            m.step % s.checkpoint_every_steps == 0 or now - self.last_checkpoint_at >= s.checkpoint_every_s
        ):
            self.checkpoint("periodic")
        due = (
            (s.publish_every_steps and m.steps_since_publish >= s.publish_every_steps)
            or (s.publish_every_samples and m.samples_since_publish >= s.publish_every_samples)
            or (s.publish_every_s and now - self.last_publish_at >= s.publish_every_s and m.steps_since_publish)
        )
        if due and self._publishing is None and self._start_publish() and not s.publish_in_background:
            self._finish_publish(block=True)

    def checkpoint(self, reason: str) -> Path:
        """Write weights, optimiser and offsets together (see services.trainer.state)."""
        m = self.meta
        m.heldout = [x.model_dump(mode="json") for x in self.heldout]
        m.written_at = time.time()
        path = state.save(
            self.state_dir, m, policy.weights(self.model), self.optimizer.state_dict(), self.settings.checkpoints_kept
        )
        self._ckpt_step = m.step
        self.last_checkpoint_at = time.monotonic()
        event(
            log,
            "checkpoint",
            step=m.step,
            reason=reason,
            offsets={str(k): v for k, v in m.offsets.items()},
            path=str(path),
        )
        return path

    def _ensure_parent(self, version: int) -> torch.nn.Module:
        """Published `version`'s weights in a frozen model (delta base, KL parent)."""
        s = self.settings
        if self.parent is None or self.parent_version != version:
            have, have_sha = None, None
            if self.parent is not None and self.parent_version is not None:
                have = (self.parent_version, policy.weights(self.parent))
                have_sha = self.store.manifest(s.model_name, self.parent_version).weights_sha256
            w = self.store.materialize(s.model_name, version, have=have, have_sha256=have_sha)
            if self.parent is None:
                self.parent = policy.frozen_copy(self.model, w)
            else:
                policy.load_weights(self.parent, w)
            self.parent_version = version
        return self.parent

    def publish(self) -> ModelUpdateEvent | None:
        """Gate the current weights; if they pass, publish the next version. Waits for
        the result (and first for a publish already in flight); None when nothing shipped.

        With too few held-out samples to judge on, the gate is not run at all (its
        generations cost a CPU minute) and the attempt waits for the next step."""
        self._finish_publish(block=True)
        return self._finish_publish(block=True) if self._start_publish() else None

    def _start_publish(self) -> bool:
        """Hand a copy of the current weights to the publisher thread (False: deferred)."""
        s, m = self.settings, self.meta
        if s.gate_enabled and len(self.heldout) < s.gate_min_heldout:
            if not self._deferred_logged:
                event(log, "publish_deferred", heldout_samples=len(self.heldout), needed=s.gate_min_heldout)
                self._deferred_logged = True
            return False
        self._deferred_logged = False
        m.steps_since_publish = 0
        m.samples_since_publish = 0
        self.last_publish_at = time.monotonic()
        job = PublishJob(policy.copy_weights(self.model), m.published_version, list(self.heldout), m.step)
        done: Future[PublishOutcome] = Future()

        def work() -> None:
            try:
                done.set_result(self._gate_and_publish(job))
            except BaseException as exc:  # handed to the optimiser's thread by `_finish_publish`
                done.set_exception(exc)

        self._publishing = done
        threading.Thread(target=work, name="trainer-publish", daemon=True).start()
        return True

    def _gate_and_publish(self, job: PublishJob) -> PublishOutcome:
        """The publisher thread: gate `job`'s weights against their parent; if they pass,
        the store (artifact, then manifest), then model-updates.v1. Touches only the
        parent and candidate models and the store, never the model being trained."""
        s = self.settings
        started = time.monotonic()
        parent = self._ensure_parent(job.parent_version)
        figures: dict[str, float] = {}
        if s.gate_enabled:
            if self.candidate is None:
                self.candidate = policy.frozen_copy(self.model, job.weights)
            else:
                policy.load_weights(self.candidate, job.weights)
            result = gate.evaluate(
                self.candidate,
                parent,
                job.heldout,
                s,
                pad_id=self.pad_id,
                generate=gate.sampler(self.candidate, self.eos_ids, self.pad_id, s),
                generate_parent=gate.sampler(parent, self.eos_ids, self.pad_id, s),
            )
            figures = result.figures
            if not result.passed:
                return PublishOutcome(job, None, figures, result.failures, time.monotonic() - started)
        # Numbers stay unique after a rollback: the child of version 2 published when the
        # store already holds 5 is 6 (parent 2).
        version = max(job.parent_version, self.store.latest_version(s.model_name) or 0) + 1
        ev = self.store.publish(
            s.model_name,
            version,
            job.weights,
            parent_version=job.parent_version,
            full=version % s.full_snapshot_every_versions == 0,
            eval_metrics=figures,
            parent_weights=policy.weights(parent),
        )
        self._produce_update(ev)
        policy.load_weights(parent, job.weights)
        self.parent_version = version
        return PublishOutcome(job, ev, figures, [], time.monotonic() - started)

    def _finish_publish(self, *, block: bool) -> ModelUpdateEvent | None:
        """Take the publisher's outcome (waiting for it when `block`): adopt the new
        version as the next parent, then checkpoint. Re-raises the publisher's error."""
        pending = self._publishing
        if pending is None or (not block and not pending.done()):
            return None
        t0 = time.monotonic()
        try:
            out = pending.result()
        finally:
            self._publishing = None
            self.stats["publish_wait_s"] += time.monotonic() - t0
        s, m, job = self.settings, self.meta, out.job
        if out.event is None:
            m.counters["gate_refused"] = m.counters.get("gate_refused", 0) + 1
            event(
                log,
                "gate_refused",
                logging.WARNING,
                model=s.model_name,
                step=job.step,
                parent_version=job.parent_version,
                failures=out.failures,
                publish_s=round(out.seconds, 3),
                **out.figures,
            )
            return None
        ev = out.event
        self._lineage_before_publish = (m.published_version, m.lineage_since_ms)
        m.published_version = ev.version
        m.lineage_since_ms = ev.event_time_ms
        m.counters["published"] = m.counters.get("published", 0) + 1
        event(
            log,
            "published",
            model=s.model_name,
            version=ev.version,
            parent_version=job.parent_version,
            kind=ev.artifact_kind,
            size_bytes=ev.size_bytes,
            step=job.step,
            steps_since=m.step - job.step,
            publish_s=round(out.seconds, 3),
            **out.figures,
        )
        self.checkpoint("published")
        return ev

    def _finish_publish_quietly(self) -> None:
        """On the way out: wait for a publish in flight; its error is logged, not raised
        (the loop's own error, if any, is the one that propagates)."""
        try:
            self._finish_publish(block=True)
        except Exception as exc:
            event(log, "publish_failed", logging.ERROR, error=f"{type(exc).__name__}: {exc}")

    def _follow_rollbacks(self, events: list[ModelUpdateEvent | RolloutEvent]) -> None:
        """Reload the served version when an event abandons the one the trainer builds on.

        A rollback issued while a publish was in flight (the gate takes a while) is older
        than the version that publish adopted, so against the lineage as it stands it
        would be history. It is judged against the lineage before that publish instead:
        if it abandoned it, the published version is a child of the abandoned lineage
        that landed after the rollback, and replicas following model-updates.v1 took it.
        The trainer reloads the rolled-back version as usual (which verifies it), then
        publishes the operator's rollback again, so the replicas go back."""
        if events:
            self._finish_publish(block=True)  # decide on the lineage as it stands once published
        model = self.settings.model_name
        for ev in events:
            chain = lineage.ancestry(self.meta.published_version, self._parent_of)
            target = lineage.rollback_target(ev, model, chain, self.meta.lineage_since_ms)
            superseded = None
            if target is None and self._lineage_before_publish is not None:
                before, before_since_ms = self._lineage_before_publish
                earlier = lineage.rollback_target(ev, model, lineage.ancestry(before, self._parent_of), before_since_ms)
                if earlier is not None and ev.event_time_ms <= self.meta.lineage_since_ms:
                    superseded, target = self.meta.published_version, earlier
                    counters = self.meta.counters  # before the reload's checkpoint
                    counters["publishes_superseded"] = counters.get("publishes_superseded", 0) + 1
            if target is not None:
                self.reload(target, ev.event_time_ms, reason=type(ev).__name__)
            if superseded is not None:
                self._supersede_publish(ev, superseded)

    def _supersede_publish(self, ev: ModelUpdateEvent | RolloutEvent, superseded: int) -> None:
        """Published version `superseded` landed after `ev` rolled its lineage back to the
        version just reloaded: say so, and publish an operator's rollback again (`reload`
        verified that version; a canary rollout's rollback needs no help: the new version
        only became its next candidate)."""
        m = self.meta
        event(
            log,
            "publish_superseded_by_rollback",
            logging.WARNING,
            model=self.settings.model_name,
            version=superseded,
            rollback_to=m.published_version,
            cause=type(ev).__name__,
            rollback_time_ms=ev.event_time_ms,
        )
        if isinstance(ev, ModelUpdateEvent):
            self._produce_update(republished(self.store.manifest(self.settings.model_name, m.published_version)))

    def _parent_of(self, version: int) -> int | None:
        try:
            return self.store.manifest(self.settings.model_name, version).parent_version
        except Exception:  # a version the store does not hold ends the chain
            return None

    def reload(self, version: int, since_ms: int, reason: str = "rollback") -> None:
        """Continue from published `version`: its weights, a fresh optimiser (the
        abandoned trajectory's moments do not apply), `version` as the parent of the next
        publish; then a checkpoint, so a restart keeps following it."""
        s, m = self.settings, self.meta
        self._finish_publish(block=True)  # the publisher owns the parent model until then
        abandoned = m.published_version
        weights = self.store.materialize(s.model_name, version)
        policy.load_weights(self.model, weights)
        self.optimizer = new_optimizer(self.model, s)
        if self.group is not None:
            distributed.broadcast_object(distributed.Reload(), self.group)
            distributed.sync_start(self.model, self.optimizer, None, self.group)
        if self.parent is not None:
            policy.load_weights(self.parent, weights)
            self.parent_version = version
        m.published_version, m.lineage_since_ms = version, since_ms
        self._lineage_before_publish = None
        m.steps_since_publish = m.samples_since_publish = 0
        m.counters["rollbacks_followed"] = m.counters.get("rollbacks_followed", 0) + 1
        self.stats["rollbacks_followed"] += 1
        self.last_publish_at = time.monotonic()
        event(
            log,
            "rollback_followed",
            logging.WARNING,
            model=s.model_name,
            version=version,
            abandoned_version=abandoned,
            cause=reason,
            step=m.step,
        )
        self.checkpoint("rollback")

    def _produce_update(self, ev: ModelUpdateEvent) -> None:
        topic = MODEL_UPDATES.full_name(self.settings.topic_prefix)
        self.producer.produce(topic, encode(ev), key=key_of(ev, MODEL_UPDATES.key))
        if self.producer.flush(30) != 0:
            raise RuntimeError(f"could not deliver the model update for version {ev.version} to {topic}")


def latency_figures(values_ms: deque[int] | list[int], name: str) -> dict[str, float]:
    """`{name}_p50`, `{name}_p99` and `{name}_n` of a window of latencies (empty: nothing)."""
    if not values_ms:
        return {}
    ordered = sorted(values_ms)
    top = len(ordered) - 1
    return {
        f"{name}_p50": ordered[round(0.5 * top)],
        f"{name}_p99": ordered[round(0.99 * top)],
        f"{name}_n": len(ordered),
    }


def new_optimizer(model: torch.nn.Module, s: TrainerSettings) -> torch.optim.Optimizer:
    """The trainer's AdamW over `model`'s parameters."""
    return torch.optim.AdamW(model.parameters(), lr=s.lr, betas=s.adam_betas, weight_decay=s.weight_decay)


def accumulate_gradients(
    model: torch.nn.Module,
    reference: torch.nn.Module | None,
    work: distributed.StepWork,
    s: TrainerSettings,
    group: distributed.Group | None,
    bf16: bool = False,
) -> dict[str, float]:
    """Forward and backward this rank's micro-batches of one step (every micro-batch in
    a single process); return the loss figures of those micro-batches. The reference's
    logprobs come with the batch when the pipeline stage computed them."""
    col, n_tokens = work.collated, work.n_tokens
    device = policy.device_of(model)
    adv_t = work.advantages.to(device)
    totals: dict[str, float] = {}
    for lo, hi in distributed.micro_batches(len(adv_t), s.trainer_micro_batch_size, group):
        part = col.rows(list(range(lo, hi))).to(device)
        with policy.autocast(device, bf16):
            logp = policy.token_logprobs(model, part.input_ids, part.attention_mask, part.completion_mask)
        ref = None
        if reference is not None:
            if part.has_reference():
                ref = part.ref_logp
            else:
                with torch.no_grad(), policy.autocast(device, bf16):
                    ref = policy.token_logprobs(reference, part.input_ids, part.attention_mask, part.completion_mask)
        loss, st = losses.total_loss(
            logp,
            part.sampler_logp,
            ref,
            adv_t[lo:hi],
            part.completion_mask,
            kl_coef=s.kl_coef,
            ratio_max=s.truncate_ratio_max,
            n_tokens=n_tokens,
        )
        loss.backward()
        share = part.n_tokens / n_tokens
        for k, v in st.items():
            totals[k] = (
                max(totals.get(k, v), v)
                if k == "ratio_max"
                else totals.get(k, 0.0) + v * (1.0 if k in ("pg_loss", "kl_ref") else share)
            )
    return totals


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip_norm: float, group: distributed.Group | None
) -> float:
    """Sum the gradients across ranks (if any), clip, step, zero; the gradient norm."""
    if group is not None:
        distributed.all_reduce_gradients(model.parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def follow(settings: TrainerSettings, group: distributed.Group) -> torch.nn.Module:
    """Rank > 0 of a data-parallel trainer (see services.trainer.distributed): take rank
    0's state, compute this rank's share of every step rank 0 broadcasts, until rank 0
    stops. Reads no Kafka and writes nothing; returns the model (rank 0's weights)."""
    s = settings
    assert s.model_dir is not None
    torch.set_num_threads(s.trainer_torch_threads)
    torch.manual_seed(s.seed)
    device = policy.resolve_device(s.trainer_device, torch.cuda.is_available())
    bf16 = policy.use_bf16(s.trainer_bf16, device)
    model, _ = policy.load(Path(s.model_dir))
    model.to(device)
    reference = policy.frozen_copy(model) if s.kl_coef > 0 else None
    model.train()
    optimizer = new_optimizer(model, s)
    distributed.sync_start(model, optimizer, reference, group)
    steps = 0
    while (work := distributed.broadcast_object(None, group)) is not None:
        if isinstance(work, distributed.Reload):  # rank 0 followed a rollback
            optimizer = new_optimizer(model, s)
            distributed.sync_start(model, optimizer, None, group)
            continue
        accumulate_gradients(model, reference, work, s, group, bf16)
        optimizer_step(model, optimizer, s.grad_clip_norm, group)
        steps += 1
    event(log, "follower_stopped", rank=group.rank, optimizer_steps=steps)
    return model


def rollback_event(store: CheckpointStore, model: str, version: int) -> ModelUpdateEvent:
    """The model-updates.v1 event that republishes `version` (verified intact first)."""
    store.materialize(model, version)  # raises CorruptArtifact when it could not be served
    return republished(store.manifest(model, version))


def republished(original: ModelUpdateEvent) -> ModelUpdateEvent:
    """`original` (a version's manifest) as a rollback to it: a new event id and time."""
    from schemas.events import new_event_id, now_ms

    raw = orjson.loads(encode(original))
    raw.update(rollback=True, event_id=new_event_id(), event_time_ms=now_ms())
    return decode(ModelUpdateEvent, orjson.dumps(raw))
