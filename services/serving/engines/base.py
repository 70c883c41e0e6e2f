"""The engine interface: jobs in, sampled tokens with logprobs out, weights swapped between batches.

An engine owns one scheduler thread. Requests become `Job`s; the thread takes batches of
waiting jobs (`services.serving.batching`), runs each batch to completion while holding
`generation_lock`, and hands tokens back to the asyncio side through the job's queue. A
weight swap takes the same lock, so it happens between batches: a batch never mixes two
versions, and no request is dropped by a swap. No torch import here.

During a canary rollout an engine may hold a second weight set, the candidate. A job
asks for it (`Job.candidate`, from the sticky split); a batch holds jobs of one arm only,
and a job that asked for a candidate which is gone by the time its batch starts runs on
the stable weights. The candidate is prepared outside the lock and put in place, promoted
(it becomes the stable weights) or dropped with a reference swap under the lock.

A batch's arm is the oldest waiting job's, so neither arm starves. An engine for which an
arm switch costs something (the vLLM engine reloads its one weight set) reports the arm it
holds (`_loaded_arm`); with `arm_switch_hold_ms` > 0 the scheduler then keeps batching
that arm while jobs of it wait, until the oldest job of the other arm has waited that long
(`pick_arm`). An engine whose arms are both resident (transformers) reports none, and
batches strictly by the oldest job.

While a new version is materialized, the replica may hold new batches off for a bounded
time (`hold_batches`): on a CPU host the running batches take the cores the loader needs
(1.7 s of decoding took 6-10 s wall beside two generating replicas), and a held batch only
waits, it never fails. The running batch finishes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from services.serving.batching import ready_in_s, select_batch
from services.serving.params import GenParams
from services.serving.text import Detokenizer


@dataclass(frozen=True)
class TokenLogprob:
    """One sampled token, its logprob under the sampling distribution, and alternatives."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Delta:
    """What a job hands to its reader: new text and tokens, and the finish reason at the end."""

    text: str
    tokens: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None


class Job:
    """One request's generation. The engine thread writes it; the event loop reads it."""

    def __init__(
        self,
        prompt_ids: list[int],
        params: GenParams,
        *,
        decode: Callable[[list[int]], str],
        loop: asyncio.AbstractEventLoop,
        stream: bool,
    ) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.arrived_s = time.monotonic()
        self.prompt_len = len(prompt_ids)
        self.max_tokens = params.max_tokens
        self.stream = stream
        self.tokens: list[TokenLogprob] = []
        self.detok = Detokenizer(decode, params.stop)
        self.finish_reason: str | None = None
        self.version: int | None = None
        """The policy version that produced this completion (set when its batch starts)."""
        self.candidate = False
        """The sticky split sent this request to the rollout's candidate (if one is loaded)."""
        self.cancelled = False
        """Set by the reader when the client went away; the engine stops the row."""
        self._loop = loop
        self._queue: asyncio.Queue[Delta] = asyncio.Queue()
        self._pending: list[TokenLogprob] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def text(self) -> str:
        """The completion text (cut before a stop sequence)."""
        return self.detok.text

    # --- engine thread -------------------------------------------------------------
    def add(self, token: TokenLogprob, *, is_eos: bool) -> bool:
        """Record one sampled token; True when the job is finished after it."""
        if self.done:
            return True
        self.tokens.append(token)
        self._pending.append(token)
        if self.cancelled:
            self.finish("abort")
            return True
        if is_eos:
            self.finish("stop")
            return True
        ids = [t.token_id for t in self.tokens]
        if (self.stream or self.params.stop) and self.detok.update(ids):
            self.finish("stop")
            return True
        if len(self.tokens) >= self.max_tokens:
            self.finish("length")
            return True
        if self.stream:
            text = self.detok.delta(final=False)
            if text or self.params.want_logprobs:
                self._post(Delta(text, self._take_pending()))
        return False

    def finish(self, reason: str) -> None:
        """Mark the job finished and hand the rest of its output to the reader."""
        if self.done:
            return
        if not self.detok.stopped:
            # Final decode without the EOS token's text (special tokens are skipped anyway).
            self.detok.update([t.token_id for t in self.tokens])
        self.finish_reason = reason
        self._post(Delta(self.detok.delta(final=True), self._take_pending(), finish_reason=reason))

    def fail(self, error: BaseException) -> None:
        """End the job with an engine error."""
        if self.done:
            return
        self.finish_reason = "error"
        self._post(Delta("", [], finish_reason="error", error=error))

    def _take_pending(self) -> list[TokenLogprob]:
        out, self._pending = self._pending, []
        return out

    def _post(self, delta: Delta) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is reading any more
            self._loop.call_soon_threadsafe(self._queue.put_nowait, delta)

    # --- event loop ----------------------------------------------------------------
    async def deltas(self) -> AsyncIterator[Delta]:
        """The job's output as it arrives; the last delta has a finish_reason."""
        while True:
            delta = await self._queue.get()
            yield delta
            if delta.finish_reason is not None:
                return

    async def wait(self) -> Delta:
        """Wait for the end; returns the final delta (raises the engine's error)."""
        async for delta in self.deltas():
            if delta.error is not None:
                raise delta.error
            if delta.finish_reason is not None:
                return delta
        raise RuntimeError("job ended without a finish reason")


BatchHook = Callable[[list["Job"], float], None]
"""Called after each batch with its jobs (all finished, each naming its version; a failed
one with finish_reason "error", whether the batch or the arm switch before it failed) and
the seconds the batch held the generation lock."""


def pick_arm(
    oldest_arm: bool, oldest_waited_s: float, loaded_arm: bool | None, loaded_arm_waiting: bool, hold_s: float
) -> tuple[bool, float | None]:
    """The arm of the next batch (True: the candidate), and the seconds after which the choice
    turns to the oldest job's arm (None: it is that arm already).

    The oldest waiting job's arm, unless the engine holds the other arm's weights
    (`loaded_arm`; None: switching costs nothing), jobs of that arm are waiting too, and the
    oldest job has waited less than `hold_s`: then the loaded arm, saving a weight switch.
    So a job waits at most max(hold_s, batch wait) plus the batch running when that ends.
    """
    if loaded_arm is None or loaded_arm == oldest_arm or not loaded_arm_waiting or oldest_waited_s >= hold_s:
        return oldest_arm, None
    return loaded_arm, hold_s - oldest_waited_s


class Engine(ABC):
    """A batching engine. Subclasses implement `_run_batch` and the weight methods."""

    name: str = "base"

    def __init__(
        self, *, model_name: str, max_batch_size: int, batch_wait_ms: float, arm_switch_hold_ms: float = 0.0
    ) -> None:
        self.model_name = model_name
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.arm_switch_hold_s = arm_switch_hold_ms / 1000.0
        """How long the oldest job may wait while the other, loaded arm keeps batching (`pick_arm`)."""
        self.arm_switches = 0
        """Weight switches between the arms (engines that hold one weight set at a time)."""
        self.arm_switch_s = 0.0
        """Total wall seconds those switches held batches off."""
        self.max_batch_tokens: int | None = None
        self.version = 0
        """The policy version being served (0: the model directory); the stable one during a rollout."""
        self.candidate_version: int | None = None
        """The rollout candidate's version while its weights are loaded, else None."""
        self.generation_lock = threading.Lock()
        self.on_batch: BatchHook | None = None
        self._cv = threading.Condition()
        self._waiting: list[Job] = []
        self._swaps_pending = 0
        self._holds = 0
        self._hold_until = 0.0
        """While `_holds` > 0, no batch starts before this `time.monotonic()` deadline."""
        self._stopping = False
        self._thread: threading.Thread | None = None

    # --- what an engine provides ---------------------------------------------------
    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The HF tokenizer (chat template, encode, decode)."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Longest prompt + completion the engine accepts, in tokens."""

    @abstractmethod
    def _run_batch(self, batch: list[Job]) -> None:
        """Generate every job of the batch to its end (called with generation_lock held)."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The weights being served, name → tensor (the base a delta applies to)."""

    @abstractmethod
    def _check_weights(self, state_dict: dict[str, Any]) -> None:
        """Raise ValueError if `state_dict` cannot replace the current weights (before any swap)."""

    @abstractmethod
    def _load_weights(self, state_dict: dict[str, Any]) -> None:
        """Copy the weights in (called with generation_lock held, between batches)."""

    def _prepare_candidate(self, state_dict: dict[str, Any]) -> Any:
        """Build the candidate's weights beside the stable ones (outside the lock; checked already)."""
        raise NotImplementedError(f"the {self.name} engine holds one weight set: canary rollouts are not supported")

    def _install_candidate(self, prepared: Any) -> None:  # noqa: B027 - engines with candidates override
        """Make `prepared` the candidate slot, or empty it with None (generation_lock held)."""

    def _promote_candidate(self) -> None:
        """Make the candidate slot the stable weights and empty it (generation_lock held)."""
        raise NotImplementedError(f"the {self.name} engine holds one weight set: canary rollouts are not supported")

    def _use_candidate(self, on: bool) -> None:  # noqa: B027 - engines with candidates override
        """Run the next batch on the candidate (True) or the stable weights (generation_lock held)."""

    def candidate_state_dict(self) -> dict[str, Any] | None:
        """The candidate's weights (the base a delta may apply to), or None."""
        return None

    def _loaded_arm(self) -> bool | None:
        """The arm whose weights the engine computes with when switching arms costs a reload
        (True: the candidate), else None. Read by the scheduler without the generation lock:
        a hint for batching, never for correctness."""
        return None

    @property
    def generates_on_cpu(self) -> bool:
        """Whether generation runs on the host's CPU cores (then it competes with weight loading)."""
        return True

    def close(self) -> None:  # noqa: B027 - optional hook, most engines hold nothing to release
        """Release engine resources (after `stop`)."""

    # --- shared machinery ----------------------------------------------------------
    def decode(self, token_ids: list[int]) -> str:
        """Completion text of token ids (special tokens skipped)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def start(self) -> None:
        """Start the scheduler thread."""
        self._thread = threading.Thread(target=self._schedule, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Let the running batch finish, fail the waiting jobs, and stop the thread."""
        with self._cv:
            self._stopping = True
            waiting, self._waiting = self._waiting, []
            self._cv.notify_all()
        for job in waiting:
            job.fail(RuntimeError("the replica is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout_s)

    def submit(self, job: Job) -> None:
        """Queue a job for the next batch."""
        with self._cv:
            if self._stopping:
                raise RuntimeError("the replica is shutting down")
            self._waiting.append(job)
            self._cv.notify_all()

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for a batch."""
        return len(self._waiting)

    def swap_weights(self, version: int, state_dict: dict[str, Any]) -> None:
        """Check `state_dict`, then load it between batches and serve it as `version`.

        Blocks until done (call it from a worker thread). A failed check leaves the
        served weights untouched. While a swap waits, no new batch starts.
        """
        self._check_weights(state_dict)
        with self._cv:
            self._swaps_pending += 1
        try:
            with self.generation_lock:
                self._load_weights(state_dict)
                self.version = version
        finally:
            with self._cv:
                self._swaps_pending -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def hold_batches(self, max_s: float) -> Iterator[None]:
        """Start no new batch inside the block, for at most `max_s` seconds from its start
        (0: no hold). Waiting requests start as soon as the block ends or the time is up."""
        if max_s <= 0:
            yield
            return
        with self._cv:
            self._holds += 1
            self._hold_until = max(self._hold_until, time.monotonic() + max_s)
        try:
            yield
        finally:
            with self._cv:
                self._holds -= 1
                self._cv.notify_all()

    def _held_for_s(self, now: float) -> float:
        """Seconds new batches stay held (0: not held); called with `_cv` held."""
        return max(0.0, self._hold_until - now) if self._holds else 0.0

    def set_candidate(self, version: int, state_dict: dict[str, Any]) -> None:
        """Check `state_dict` and serve it as the rollout candidate `version` (replacing any other).

        Blocks while the weights are built (from a worker thread); batches hold off only
        for the reference swap."""
        self._check_weights(state_dict)
        prepared = self._prepare_candidate(state_dict)
        with self.generation_lock:
            self._install_candidate(prepared)
            self.candidate_version = version

    def promote_candidate(self) -> int:
        """Serve the candidate as the stable version for everyone; returns the version promoted."""
        with self.generation_lock:
            if self.candidate_version is None:
                raise RuntimeError("no candidate to promote")
            self._promote_candidate()
            self.version, self.candidate_version = self.candidate_version, None
            return self.version

    def drop_candidate(self) -> None:
        """Stop serving the candidate (its jobs run on the stable weights) and free it."""
        with self.generation_lock:
            self._install_candidate(None)
            self.candidate_version = None

    def _arm(self, job: Job) -> bool:
        return job.candidate and self.candidate_version is not None

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            while True:
                if self._stopping:
                    return None
                # Drop jobs whose client went away before they started.
                for job in [j for j in self._waiting if j.cancelled]:
                    self._waiting.remove(job)
                    job.finish("abort")
                now = time.monotonic()
                # One arm per batch: the oldest job's, so neither arm starves (or, for a
                # bounded wait, the arm whose weights are loaded: `pick_arm`).
                arm, turns_in = False, None
                if self._waiting:
                    loaded = self._loaded_arm() if self.arm_switch_hold_s > 0 else None
                    arm, turns_in = pick_arm(
                        self._arm(self._waiting[0]),
                        now - self._waiting[0].arrived_s,
                        loaded,
                        loaded is not None and any(self._arm(j) == loaded for j in self._waiting),
                        self.arm_switch_hold_s,
                    )
                pool = [i for i, j in enumerate(self._waiting) if self._arm(j) == arm]
                oldest = self._waiting[pool[0]].arrived_s if pool else None
                wait = ready_in_s(len(pool), oldest, now, self.max_batch_size, self.batch_wait_s)
                if wait is not None and turns_in is not None:
                    wait = min(wait, turns_in)
                held_s = self._held_for_s(now)
                if wait == 0.0 and self._swaps_pending == 0 and held_s == 0.0:
                    chosen = [
                        pool[i]
                        for i in select_batch(
                            [self._waiting[i] for i in pool], self.max_batch_size, self.max_batch_tokens
                        )
                    ]
                    batch = [self._waiting[i] for i in chosen]
                    for i in reversed(chosen):
                        del self._waiting[i]
                    return batch
                if wait is None or self._swaps_pending:
                    self._cv.wait()
                else:
                    self._cv.wait(timeout=max(wait, held_s))

    def _schedule(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            with self.generation_lock:
                started = time.monotonic()
                on_candidate = self._arm(batch[0])
                for job in batch:
                    job.version = self.candidate_version if on_candidate else self.version
                try:
                    self._use_candidate(on_candidate)  # may reload weights (vLLM): may fail
                    self._run_batch(batch)
                except Exception as exc:  # one bad batch must not kill the replica
                    for job in batch:
                        job.fail(exc)
                for job in batch:
                    if not job.done:
                        job.finish("length")
                if self.on_batch is not None:
                    with contextlib.suppress(Exception):
                        self.on_batch(batch, time.monotonic() - started)
