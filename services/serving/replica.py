"""One replica: the engine, the event sink, the update follower, and the hot-swap loader.

Hot swap, in order:
1. the follower hands over a ModelUpdateEvent for this model (the newest one, after the
   start-up catch-up); a newer event replaces one not yet started;
2. the loader thread materialises that version from the checkpoint store, passing the
   weights being served as `have` so a delta applies to them, with every checksum
   verified; an engine on the GPU keeps generating meanwhile, one on the CPU finishes
   its running batch and starts no new one until step 3 is done (at most
   `load_hold_max_s`), so the load has the cores;
3. the engine checks names, shapes, dtypes and finiteness, then takes its generation
   lock (between batches), copies the weights in and bumps the served version;
4. replica-status.v1 reports the new version (or, on any failure in 2-3, the error and
   the old version, which is still served).

With canary rollouts on (`rollout_enabled`), the replica follows rollouts.v1 instead and
converges on the split the latest event declares, in this order: the stable version
(a reference swap when it is the loaded candidate, i.e. a promote; a hot swap as above
otherwise), then the candidate (built beside the stable weights, or dropped on a
rollback), then the traffic share. Requests reach the candidate only once its weights
are in (`wants_candidate`), so a replica that is still loading serves stable.

Every replica counts, per policy version, the requests its engine ran, the ones that
failed, and a latency histogram of the answered ones (`VersionTrafficCounter`), and
reports them cumulatively on each replica-status.v1 heartbeat; the streams worker's
rollout guardrails (error rate, latency p95) read them. While a candidate is loaded the
heartbeat runs at least every `candidate_status_interval_s` (ServingSettings), so a
failing or slow candidate is seen within seconds.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from schemas.events import ModelUpdateEvent, ReplicaState, ReplicaStatusEvent, RolloutEvent, VersionTraffic
from schemas.topics import GENERATIONS, MODEL_UPDATES, REPLICA_STATUS, ROLLOUTS
from services.logs import event as log_event
from services.serving.engines.base import Engine
from services.serving.events import EventSink
from services.serving.metrics import ReplicaMetrics, VersionTrafficCounter
from services.serving.settings import ServingSettings
from services.serving.split import Split
from services.serving.updates import UpdateFollower

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SwapRecord:
    """One version swapped in: when it started being served and how long serving paused."""

    version: int
    served_at: float
    """Wall-clock time (`time.time()`) the version became the one served."""
    pause_s: float
    """Time the generation lock was held to copy the weights in (no batch runs meanwhile)."""
    load_s: float
    """Time from taking the update to serving it (materialise, check, wait for the batch, copy)."""
    held_s: float = 0.0
    """Time new batches were held off while the version was materialized (`load_hold_max_s`)."""


class Replica:
    """Everything a serving replica runs besides the HTTP server."""

    def __init__(
        self,
        settings: ServingSettings,
        engine: Engine,
        sink: EventSink,
        *,
        bootstrap: str | None,
        replica_id: str,
        url: str | None,
        store: Any = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.sink = sink
        self.bootstrap = bootstrap
        self.replica_id = replica_id
        self.url = url
        self._store = store
        self.metrics = ReplicaMetrics()
        self.traffic = VersionTrafficCounter()
        """Requests, failures and latencies per policy version (reported on replica-status.v1)."""
        self.state = ReplicaState.STARTING
        self.last_error: str | None = None
        self.requests_total = 0
        self.started_at = time.time()
        self.follower: UpdateFollower | None = None
        self._wanted: ModelUpdateEvent | RolloutEvent | None = None
        self.split = Split(engine.version)
        """The traffic split being served (canary rollouts only)."""
        self._tried_event_id: str | None = None
        self._cv = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loading = False
        self.swaps: deque[SwapRecord] = deque(maxlen=1000)
        """The latest swaps, oldest first (benchmarks read pauses and serving times here)."""
        self._last_pause_s = 0.0
        self._last_hold_s = 0.0
        """How long the last load (materialize and swap) held new batches off (`load_hold_max_s`)."""
        self._weights_sha: dict[int, str] = {}
        """Weights checksum of the versions the engine holds (stable, candidate): their
        manifest's, remembered when they were materialized, or computed at start for the
        model directory's; the next delta's base needs no re-hashing."""
        engine.on_batch = self._on_batch
        self._time_weight_copies()
        m = self.metrics
        m.gauge("rlfeed_serving_policy_version", "Policy version being served.", lambda: self.engine.version)
        m.gauge("rlfeed_serving_queue_depth", "Requests waiting for a batch.", lambda: self.engine.queue_depth)
        m.gauge(
            "rlfeed_serving_arm_switches",
            "Weight reloads between a rollout's arms (engines holding one weight set: vLLM).",
            lambda: self.engine.arm_switches,
        )
        m.gauge(
            "rlfeed_serving_arm_switch_seconds",
            "Total seconds arm switches held batches off.",
            lambda: self.engine.arm_switch_s,
        )
        m.gauge("rlfeed_serving_events_buffered", "Events held in memory for the broker.", lambda: self.sink.buffered)
        m.gauge("rlfeed_serving_events_delivered", "Events the broker acknowledged.", lambda: self.sink.delivered)
        m.labelled_gauge(
            "rlfeed_serving_events_dropped", "Events lost, by reason.", "reason", self.sink.dropped_by_reason
        )

    # --- lifecycle -----------------------------------------------------------------
    @property
    def store(self) -> Any:
        """The checkpoint store (opened on first use: it imports torch)."""
        if self._store is None:
            from services.checkpoints.store import CheckpointStore

            self._store = CheckpointStore(self.settings.resolved_checkpoint_dir)
        return self._store

    def start(self) -> None:
        """Start the engine, the loader, the heartbeat and (with a broker) the follower."""
        self.engine.start()
        self._spawn(self._load_loop, "weight-loader")
        self._spawn(self._heartbeat, "status-heartbeat")
        if self.bootstrap is not None and self.settings.follow_updates:
            self.follower = UpdateFollower(
                self.bootstrap,
                topic_prefix=self.settings.topic_prefix,
                model=self.settings.model_name,
                replica_id=self.replica_id,
                on_update=self.offer_update,
                topic=ROLLOUTS if self.settings.rollout_enabled else MODEL_UPDATES,
                event_type=RolloutEvent if self.settings.rollout_enabled else ModelUpdateEvent,
                idle_pause_ms=self.settings.kafka_idle_pause_ms,
            )
            self.follower.start()
        self.state = ReplicaState.SERVING
        self.report()
        log_event(
            log,
            "replica_serving",
            replica_id=self.replica_id,
            url=self.url,
            engine=self.engine.name,
            model=self.settings.model_name,
            version=self.engine.version,
            kafka=self.bootstrap,
        )

    def stop(self) -> None:
        """Stop following, finish the running batch, report STOPPED, flush events."""
        self._stop.set()
        with self._cv:
            self._cv.notify_all()
        if self.follower is not None:
            self.follower.stop()
        self.engine.stop()
        for t in self._threads:
            t.join(10)
        self.state = ReplicaState.STOPPED
        self.report()
        self.sink.close(5.0)
        self.engine.close()
        log_event(log, "replica_stopped", replica_id=self.replica_id, events_dropped=self.sink.dropped_by_reason())

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # --- status --------------------------------------------------------------------
    def status_event(self, state: ReplicaState | None = None, error: str | None = None) -> ReplicaStatusEvent:
        return ReplicaStatusEvent(
            replica_id=self.replica_id,
            model=self.settings.model_name,
            version=self.engine.version,
            state=state or self.state,
            engine=self.engine.name,  # type: ignore[arg-type]
            url=self.url,
            error=(error or self.last_error or None) and (error or self.last_error or "")[:10_000],
            requests_total=self.requests_total,
            started_ms=int(self.started_at * 1000),
            traffic=[VersionTraffic(**t) for t in self.traffic.snapshot()],
            events_dropped=self.sink.dropped_by_reason(),
        )

    def report(self, state: ReplicaState | None = None, error: str | None = None) -> None:
        """Emit a replica-status.v1 event."""
        if self.sink.emit(REPLICA_STATUS, self.status_event(state, error)):
            self.metrics.events_emitted.labels(REPLICA_STATUS.name).inc()

    def _heartbeat(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(min(self.settings.status_interval_s, self.settings.candidate_status_interval_s)):
            if time.monotonic() - last >= self._heartbeat_interval_s():
                self.report()
                last = time.monotonic()

    def _heartbeat_interval_s(self) -> float:
        interval = self.settings.status_interval_s
        if self.engine.candidate_version is not None:
            return min(interval, self.settings.candidate_status_interval_s)
        return interval

    def emit_generation(self, ev: Any) -> None:
        """Send a GenerationEvent (never blocks); its latency counts for its version. The
        event goes out first: the answer the user saw is the record the loop learns from.
        Raises only if the event was not handed to the sink."""
        if self.sink.emit(GENERATIONS, ev):
            self.metrics.events_emitted.labels(GENERATIONS.name).inc()
        if ev.latency_ms is None:
            return
        try:
            self.traffic.answered(ev.policy_version, ev.latency_ms)
        except Exception as exc:  # the event is out; a counting bug must not count it as lost
            log_event(log, "traffic_count_failed", logging.ERROR, version=ev.policy_version, error=repr(exc))

    def _on_batch(self, batch: list[Any], seconds: float) -> None:
        """Batch metrics, and requests and failures per version (a batch is one arm; every
        job is finished and names its version, a failed one has finish_reason "error")."""
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_seconds.observe(seconds)
        self.metrics.completion_tokens.inc(sum(len(j.tokens) for j in batch))
        by_version: dict[int, list[int]] = {}
        for job in batch:
            if job.version is None:
                continue
            counts = by_version.setdefault(job.version, [0, 0])
            counts[0] += 1
            counts[1] += int(job.finish_reason == "error")
        for version, (requests, failures) in by_version.items():
            self.traffic.ran(version, requests, failures)

    # --- hot swap ------------------------------------------------------------------
    def _time_weight_copies(self) -> None:
        """Measure the swap pause: wrap the engine's `_load_weights`, which `Engine.swap_weights`
        calls with the generation lock held, so its duration is how long batches are held off."""
        load = self.engine._load_weights

        def timed(state_dict: dict[str, Any]) -> None:
            started = time.perf_counter()
            try:
                load(state_dict)
            finally:
                self._last_pause_s = time.perf_counter() - started
                self.metrics.swap_pause_seconds.observe(self._last_pause_s)

        self.engine._load_weights = timed  # type: ignore[method-assign]

    def offer_update(self, ev: ModelUpdateEvent | RolloutEvent) -> None:
        """Queue a model update or a rollout split (the newest offered wins); called by the follower."""
        if ev.model != self.settings.model_name:
            return
        with self._cv:
            self._wanted = ev
            self._cv.notify_all()

    @property
    def loading(self) -> bool:
        """Whether a version is being loaded right now or waits to be."""
        return self._loading or self._wanted is not None

    def _load_loop(self) -> None:
        from services.checkpoints.delta import warm_up, weights_sha256

        warm_up()  # the delta decoder's kernels, before the first update needs them
        # The checksum of the weights served from the start (the model directory's), while
        # idle: the first delta then needs no hashing of its base (0.44 s CPU, SmolLM2 fp32).
        version = self.engine.version
        self._weights_sha.setdefault(version, weights_sha256(self.engine.state_dict()))
        while True:
            with self._cv:
                while self._wanted is None and not self._stop.is_set():
                    self._cv.wait()
                if self._stop.is_set():
                    return
                ev, self._wanted = self._wanted, None
                self._loading = True
            try:
                if isinstance(ev, RolloutEvent):
                    self.apply_rollout(ev)
                else:
                    self.apply_update(ev)
            finally:
                self._loading = False

    def _materialize(self, version: int) -> dict[str, Any]:
        """`version`'s verified weights, built from the stable ones the engine serves."""
        model, current = self.settings.model_name, self.engine.version
        weights = self.store.materialize(
            model, version, have=(current, self.engine.state_dict()), have_sha256=self._weights_sha.get(current)
        )
        known = {v: self._weights_sha[v] for v in (current, self.engine.candidate_version) if v in self._weights_sha}
        sha = self.store.manifest(model, version).weights_sha256
        self._weights_sha = known | ({version: sha} if sha else {})
        return weights

    @contextlib.contextmanager
    def _holding_batches(self) -> Iterator[None]:
        """Hold new batches off while a version is built and put in place (CPU engines only,
        up to `load_hold_max_s`): the cores go to the load. It covers the swap too, so the
        batches it held do not start the moment the weights are ready and make the swap wait."""
        hold_s = self.settings.load_hold_max_s if self.engine.generates_on_cpu else 0.0
        started = time.monotonic()
        try:
            with self.engine.hold_batches(hold_s):
                yield
        finally:
            self._last_hold_s = min(hold_s, time.monotonic() - started)

    def apply_update(self, ev: ModelUpdateEvent) -> bool:
        """Load and swap in `ev`'s version; on failure keep serving and report. True if swapped."""
        return self._load_stable(ev.version, ev.event_id, rollback=ev.rollback, kind=str(ev.artifact_kind))

    def _load_stable(self, version: int, event_id: str, *, rollback: bool, kind: str) -> bool:
        current = self.engine.version
        if version == current:
            return False
        if event_id == self._tried_event_id and self.last_error:
            return False  # this exact event already failed; wait for a new one
        self._tried_event_id = event_id
        started = time.monotonic()
        self.state = ReplicaState.LOADING
        self.report()
        log_event(
            log,
            "weights_loading",
            version=version,
            serving=current,
            rollback=rollback,
            kind=kind,
        )
        try:
            with self._holding_batches():
                weights = self._materialize(version)
                materialized_s = time.monotonic() - started
                self.engine.swap_weights(version, weights)
        except Exception as exc:
            self.last_error = f"version {version} not loaded, still serving {current}: {type(exc).__name__}: {exc}"
            self.metrics.swap_failures.inc()
            self.state = ReplicaState.ERROR
            log_event(log, "weights_load_failed", logging.ERROR, version=version, serving=current, error=str(exc))
            self.report()
            self.state = ReplicaState.SERVING
            return False
        seconds = time.monotonic() - started
        self.swaps.append(SwapRecord(version, time.time(), self._last_pause_s, seconds, self._last_hold_s))
        self.last_error = None
        self.metrics.swaps.inc()
        self.metrics.swap_seconds.observe(seconds)
        self.state = ReplicaState.SERVING
        log_event(
            log,
            "weights_swapped",
            version=version,
            previous=current,
            rollback=rollback,
            seconds=round(seconds, 3),
            materialize_s=round(materialized_s, 3),
            pause_ms=round(self._last_pause_s * 1000, 3),
            batches_held_ms=round(self._last_hold_s * 1000, 3),
        )
        self.report()
        return True

    # --- canary rollouts -----------------------------------------------------------
    def wants_candidate(self, user_id: str | None) -> bool:
        """Whether this user's request goes to the rollout candidate (sticky; loaded candidates only)."""
        split = self.split
        return (
            split.candidate_version is not None
            and self.engine.candidate_version == split.candidate_version
            and split.wants_candidate(self.settings.model_name, user_id)
        )

    def apply_rollout(self, ev: RolloutEvent) -> None:
        """Converge on the split `ev` declares: stable, then candidate, then traffic (see the module doc)."""
        engine = self.engine
        if ev.stable_version != engine.version:
            if engine.candidate_version == ev.stable_version:
                promoted = engine.promote_candidate()
                log_event(log, "rollout_promoted", version=promoted, reason=ev.reason[:200])
                self.report()
            elif not self._load_stable(ev.stable_version, ev.event_id, rollback=True, kind="rollout"):
                return  # still on the old stable: keep its split, wait for the next event
        want = ev.candidate_version if ev.candidate_traffic > 0 else None
        if want is None and engine.candidate_version is not None:
            dropped = engine.candidate_version
            engine.drop_candidate()
            log_event(log, "rollout_candidate_dropped", version=dropped, decision=str(ev.decision))
        elif want is not None and engine.candidate_version != want:
            try:
                with self._holding_batches():
                    engine.set_candidate(want, self._materialize(want))
            except Exception as exc:
                self.last_error = f"candidate {want} not loaded, serving {engine.version} to all: {exc}"
                self.metrics.swap_failures.inc()
                log_event(log, "rollout_candidate_failed", logging.ERROR, version=want, error=str(exc))
                self.report(ReplicaState.ERROR)
                want = None
            else:
                log_event(log, "rollout_candidate_loaded", version=want, stable=engine.version)
        self.split = Split(engine.version, want, ev.candidate_traffic if want is not None else 0.0)
        log_event(
            log,
            "rollout_split",
            stable=self.split.stable_version,
            candidate=self.split.candidate_version,
            traffic=self.split.candidate_traffic,
            decision=str(ev.decision),
        )
