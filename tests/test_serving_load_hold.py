"""New batches wait while a version materializes (CPU engines): the engine's bounded hold
on the real scheduler, and the replica taking it around the checkpoint store's work."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from services.serving.engines.base import Job
from services.serving.params import GenParams
from tests.test_serving_support import FakeEngine, wait_for


class _Engine(FakeEngine):
    def __init__(self, on_cpu: bool = True) -> None:
        super().__init__()
        self.on_cpu = on_cpu

    @property
    def generates_on_cpu(self) -> bool:
        return self.on_cpu


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def _job(loop: asyncio.AbstractEventLoop) -> Job:
    return Job([1, 2], GenParams(max_tokens=1), decode=lambda ids: "", loop=loop, stream=False)


@pytest.fixture
def engine():
    engine = _Engine()
    engine.start()
    yield engine
    engine.stop()


def test_no_batch_starts_inside_a_hold_and_waiting_jobs_start_when_it_ends(loop, engine: _Engine) -> None:
    with engine.hold_batches(60.0):
        job = _job(loop)
        engine.submit(job)
        time.sleep(0.3)
        assert not job.done and engine.started == [] and engine.queue_depth == 1
        released = time.monotonic()
    wait_for(lambda: job.done, 10, "the held job")
    assert job.finish_reason == "length" and engine.started[0] >= released


def test_a_hold_ends_after_its_bound_even_if_the_load_does_not(loop, engine: _Engine) -> None:
    with engine.hold_batches(0.4):
        entered = time.monotonic()
        job = _job(loop)
        engine.submit(job)
        wait_for(lambda: job.done, 10, "the job after the bound")
        assert engine.started[0] - entered >= 0.35


def test_a_zero_hold_holds_nothing(loop, engine: _Engine) -> None:
    with engine.hold_batches(0.0):
        job = _job(loop)
        engine.submit(job)
        wait_for(lambda: job.done, 10, "the job")


class _SlowStore:
    """A checkpoint store whose materialize waits until the test lets it go."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def materialize(self, model: str, version: int, have: Any = None, *, have_sha256: Any = None) -> dict:
        self.entered.set()
        assert self.release.wait(30)
        return {"w": version}

    def manifest(self, model: str, version: int) -> Any:
        return type("Manifest", (), {"weights_sha256": None})()


@pytest.mark.parametrize("on_cpu", [True, False])
def test_replica_holds_batches_while_a_version_materializes_on_cpu_engines(loop, on_cpu: bool) -> None:
    from schemas.events import ModelUpdateEvent
    from services.serving.events import EventSink
    from services.serving.replica import Replica
    from services.serving.settings import ServingSettings

    engine, store = _Engine(on_cpu=on_cpu), _SlowStore()
    settings = ServingSettings(model_name="m", follow_updates=False, load_hold_max_s=60.0)
    replica = Replica(settings, engine, EventSink(None), bootstrap=None, replica_id="r", url=None, store=store)
    replica.start()
    try:
        replica.offer_update(
            ModelUpdateEvent(
                model="m",
                version=1,
                parent_version=0,
                base_version=0,
                artifact_kind="delta",
                artifact_url="file:///nowhere",
                sha256="0" * 64,
                size_bytes=1,
            )
        )
        assert store.entered.wait(60)
        job = _job(loop)
        engine.submit(job)
        if on_cpu:  # held while the version loads
            time.sleep(0.3)
            assert not job.done
        else:  # run while the version loads
            wait_for(lambda: job.done, 30, "the job during the load")
        store.release.set()
        wait_for(lambda: engine.version == 1 and job.done, 30, "the swap and the job")
        assert engine.weights_loaded == [{"w": 1}]
        held_s = replica.swaps[-1].held_s
        assert held_s >= 0.3 if on_cpu else held_s == 0.0
    finally:
        store.release.set()
        replica.stop()
