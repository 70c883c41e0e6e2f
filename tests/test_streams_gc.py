"""The worker process's garbage-collector settings (streams.hot_path.tune_gc)."""

from __future__ import annotations

import gc

from streams.hot_path import GC_THRESHOLDS, tune_gc


def test_tune_gc_freezes_what_is_alive_and_makes_collections_rarer() -> None:
    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() > 0
        alive = object.__new__(type("Alive", (), {}))
        assert gc.is_tracked(alive)  # new objects are still collected, only less often
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
