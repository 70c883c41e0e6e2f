"""Scoring generations with the published reward model, in batches, off the caller's thread.

`BackgroundScorer` owns one thread: callers `submit` (generation id, prompt, completion)
without blocking (a full queue drops the item and counts it), the thread drains the
queue into batches of up to `batch_size` (waiting at most `linger_s` for a batch to
fill), scores each batch with one forward pass and puts the scores into a bounded map
that callers read by generation id (`scores.get(gid)`: a score or None, never a wait).

The model follows model-updates.v1: `want(version)` asks for a version and the thread
loads it between batches; until one is loaded (nothing published yet, a corrupt
artifact, a missing backbone package) batches are skipped and counted as
`unavailable`, and a failed load is retried after `retry_s`.

`load_published` builds a scoring function from the checkpoint store; it is the only
part that imports torch, and only when called.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from services.logs import event

log = logging.getLogger(__name__)

ScoreFn = Callable[[Sequence[str], Sequence[str]], list[float]]
"""(prompts, completions) -> one reward per pair."""
Loader = Callable[[int | None], tuple[int, ScoreFn]]
"""version (None: the latest published) -> (the version loaded, its ScoreFn); raises when unavailable."""


class ScoreMap:
    """Scores by generation id, the oldest forgotten beyond `max_items`. One writer
    thread; readers use `get`, which never blocks on the writer for long."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def put_many(self, items: Sequence[tuple[str, float]]) -> None:
        """Store scores, evicting the oldest beyond the bound."""
        with self._lock:
            for gid, score in items:
                self._items[gid] = score
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get(self, gid: str, default: float | None = None) -> float | None:
        """The score of a generation, or `default` when it was not scored (yet)."""
        with self._lock:
            return self._items.get(gid, default)

    def __len__(self) -> int:
        return len(self._items)


class BackgroundScorer:
    """A thread that scores submitted generations in batches with the current model."""

    def __init__(
        self,
        loader: Loader,
        *,
        batch_size: int = 64,
        queue_max: int = 10_000,
        max_scores: int = 200_000,
        linger_s: float = 0.05,
        retry_s: float = 30.0,
    ) -> None:
        self.loader = loader
        self.batch_size = batch_size
        self.linger_s = linger_s
        self.retry_s = retry_s
        self.scores = ScoreMap(max_scores)
        self.stats: Counter[str] = Counter()
        self.version: int | None = None
        """The version loaded (None: none yet)."""
        self._queue: queue.Queue[tuple[str, str, str]] = queue.Queue(maxsize=queue_max)
        self._fn: ScoreFn | None = None
        self._wanted: int | None = None
        self._want_pending = True  # load the latest published version at start
        self._next_try = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rlfeed-rm-scorer", daemon=True)

    # --- caller side (never blocks) ---
    def start(self) -> BackgroundScorer:
        """Start the scoring thread."""
        self._thread.start()
        return self

    def submit(self, gid: str, prompt: str, completion: str) -> None:
        """Queue one generation for scoring; drops and counts it when the queue is full."""
        try:
            self._queue.put_nowait((gid, prompt, completion))
        except queue.Full:
            self.stats["dropped"] += 1

    def want(self, version: int | None) -> None:
        """Ask for `version` (None: the latest published); loaded between batches."""
        if version is not None and version == self.version:
            return
        self._wanted, self._want_pending, self._next_try = version, True, 0.0

    def status(self) -> dict[str, Any]:
        """Counters for the worker's stats, prefixed `reward_model_`."""
        out: dict[str, Any] = {f"reward_model_{k}": v for k, v in self.stats.items()}
        out["reward_model_version"] = self.version
        out["reward_model_queued"] = self._queue.qsize()
        return out

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far was scored or skipped (tests, benchmarks)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.005)
        return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the thread (what is queued is dropped)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # --- the thread ---
    def _maybe_load(self) -> None:
        if not self._want_pending or time.monotonic() < self._next_try:
            return
        wanted = self._wanted
        started = time.monotonic()
        try:
            version, fn = self.loader(wanted)
        except Exception as exc:
            self.stats["load_failures"] += 1
            self._next_try = time.monotonic() + self.retry_s
            event(log, "reward_model.unavailable", level=logging.WARNING, version=wanted, error=repr(exc)[:300])
            return
        if self._wanted == wanted:
            self._want_pending = False
        self._fn, self.version = fn, version
        self.stats["loads"] += 1
        event(log, "reward_model.loaded", version=version, load_s=round(time.monotonic() - started, 3))

    def _take_batch(self) -> list[tuple[str, str, str]]:
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.linger_s
        while len(batch) < self.batch_size:
            left = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._take_batch()
            self._maybe_load()  # after the wait, so a version asked for meanwhile scores this batch
            if not batch:
                continue
            try:
                self._score(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    def _score(self, batch: list[tuple[str, str, str]]) -> None:
        fn = self._fn
        if fn is None:
            self.stats["unavailable"] += len(batch)
            return
        try:
            values = fn([p for _, p, _ in batch], [c for _, _, c in batch])
        except Exception as exc:
            self.stats["score_errors"] += len(batch)
            event(log, "reward_model.score_failed", level=logging.WARNING, error=repr(exc)[:300])
            return
        self.scores.put_many([(gid, float(v)) for (gid, _, _), v in zip(batch, values, strict=True)])
        self.stats["scored"] += len(batch)
        self.stats["batches"] += 1


def load_published(
    store_dir: str | Path,
    model_name: str,
    version: int | None,
    *,
    torch_threads: int | None = None,
    batch_size: int = 64,
) -> tuple[int, ScoreFn]:
    """The reward model `version` (None: the latest) from the checkpoint store, as a ScoreFn.

    Raises FileNotFoundError when nothing is published (or the backbone package is
    missing), CorruptArtifact when the artifact fails its checksums."""
    import torch

    from services.checkpoints.store import CheckpointStore
    from services.preferences.model import RewardModel, finetuned_layers_of

    if torch_threads:
        torch.set_num_threads(torch_threads)
    store = CheckpointStore(store_dir)
    if version is None:
        version = store.latest_version(model_name)
        if version is None:
            raise FileNotFoundError(f"no version of {model_name} in {store.root}")
    weights = store.materialize(model_name, version)
    model = RewardModel(finetune_layers=finetuned_layers_of(weights))
    model.load_trainable_state(weights)
    model.eval()

    def score(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return model.score(prompts, completions, batch_size=batch_size)

    return version, score
