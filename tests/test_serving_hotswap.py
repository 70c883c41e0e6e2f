"""Hot swap from model-updates.v1 through the real checkpoint store: requests in flight
all succeed while the version changes, a corrupt update keeps the old weights, a rollback
is applied, and a replica started later catches up from the compacted topic."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from schemas.codec import encode, key_of
from schemas.events import GenerationEvent, ModelUpdateEvent, ReplicaStatusEvent
from schemas.topics import GENERATIONS, MODEL_UPDATES, REPLICA_STATUS
from services.kafka.producers import producer_config
from tests.test_serving_support import consume, wait_for

MODEL = "swap-policy"


def _produce(bootstrap: str, prefix: str, ev: ModelUpdateEvent) -> None:
    from confluent_kafka import Producer

    p = Producer({**producer_config(bootstrap)})
    p.produce(MODEL_UPDATES.full_name(prefix), value=encode(ev), key=key_of(ev, MODEL_UPDATES.key))
    assert p.flush(30) == 0


def _health(srv) -> dict:
    return httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=30).json()


@pytest.mark.timeout(240)
def test_hot_swap_corrupt_update_rollback_and_catch_up(
    kafka_bootstrap: str, topic_prefix: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import load_file

    from services.checkpoints.store import CheckpointStore
    from services.serving.server import ServerThread
    from services.serving.settings import ServingSettings

    store = CheckpointStore(tmp_path / "checkpoints")
    v0 = load_file(tiny_model_dir / "model.safetensors")
    store.publish(MODEL, 0, v0, parent_version=None, full=True)
    v1 = {k: (t * 1.5 if "mlp" in k else t.clone()) for k, t in v0.items()}
    ev1 = store.publish(MODEL, 1, v1, parent_version=0, full=False)
    assert ev1.artifact_kind == "delta"

    settings = ServingSettings(
        kafka_url=f"kafka://{kafka_bootstrap}",
        topic_prefix=topic_prefix,
        model_dir=tiny_model_dir,
        model_name=MODEL,
        serving_port=0,
        home_dir=tmp_path / "home",
        checkpoint_dir=store.root,
        replica_id="swap-a",
        max_batch_size=4,
        batch_wait_ms=2,
        default_max_tokens=6,
    )
    with ServerThread(settings) as srv, openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as client:
        wait_for(lambda: srv.replica.follower.caught_up.is_set(), 30, "the follower to catch up")
        # --- 1. swap while requests are in flight -------------------------------------
        stop = threading.Event()
        results: list[tuple[str, int]] = []
        errors: list[BaseException] = []

        def load(i: int) -> None:
            while not stop.is_set():
                try:
                    if i % 2:
                        chunks = list(
                            client.chat.completions.create(
                                model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], stream=True
                            )
                        )
                        versions = {c.model_extra["policy_version"] for c in chunks}
                        assert len(versions) == 1 and chunks[-1].choices[0].finish_reason
                        results.append((chunks[0].model_extra["generation_id"], versions.pop()))
                    else:
                        r = client.completions.create(model=MODEL, prompt=f"go {i}", max_tokens=6)
                        assert r.choices[0].finish_reason
                        results.append((r.model_extra["generation_id"], r.model_extra["policy_version"]))
                except BaseException as exc:
                    errors.append(exc)
                    return

        # Batches held off while the version loads (CPU engine): the load is stretched by
        # 0.6 s so that, under this load, batches would start inside it without the hold.
        engine, loading, batch_starts = srv.replica.engine, [], []
        materialize, run_batch = srv.replica.store.materialize, engine._run_batch

        def slow_materialize(*args, **kwargs):
            started = time.monotonic()
            weights = materialize(*args, **kwargs)
            time.sleep(0.6)
            loading.append((started, time.monotonic()))
            return weights

        def timed_batch(batch):
            batch_starts.append(time.monotonic())
            return run_batch(batch)

        srv.replica.store.materialize = slow_materialize
        engine._run_batch = timed_batch
        threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            wait_for(lambda: len(results) >= 4, 60, "requests on version 0")
            _produce(kafka_bootstrap, topic_prefix, ev1)
            wait_for(lambda: srv.replica.engine.version == 1, 60, "version 1 to be served")
            n = len(results)
            wait_for(lambda: len(results) >= n + 4 or bool(errors), 60, "requests on version 1")
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors, errors
        assert {v for _, v in results} == {0, 1}
        (began, ended), *_ = loading
        assert not [t for t in batch_starts if began < t < ended], "a batch started while the version loaded"
        assert [t for t in batch_starts if t > ended], "no batch after the load"
        del srv.replica.store.materialize, engine._run_batch
        sd = srv.replica.engine.model.state_dict()
        assert all(torch.equal(sd[k], v1[k]) for k in v1)  # bit-exact
        r = client.completions.create(model=MODEL, prompt="after", max_tokens=2)
        assert r.model_extra["policy_version"] == 1

        # --- 2. a corrupt update: old weights stay, the error is reported ---------------
        v2 = {k: (t * 0.5 if "mlp" in k else t.clone()) for k, t in v1.items()}
        ev2 = store.publish(MODEL, 2, v2, parent_version=1, full=False)
        artifact = store.resolve(ev2.artifact_url)
        data = bytearray(artifact.read_bytes())
        data[len(data) // 2] ^= 0xFF
        artifact.write_bytes(bytes(data))
        _produce(kafka_bootstrap, topic_prefix, ev2)
        wait_for(lambda: _health(srv)["last_update_error"] is not None, 60, "the corrupt update to be rejected")
        health = _health(srv)
        assert health["policy_version"] == 1 and health["status"] == "ok"
        assert "version 2" in health["last_update_error"]
        sd = srv.replica.engine.model.state_dict()
        assert all(torch.equal(sd[k], v1[k]) for k in v1)
        r = client.completions.create(model=MODEL, prompt="still here", max_tokens=2)
        assert r.model_extra["policy_version"] == 1

        # --- 3. rollback to version 0 ---------------------------------------------------
        ev0 = store.manifest(MODEL, 0).model_copy(update={"rollback": True, "event_id": "rollback-to-0"})
        _produce(kafka_bootstrap, topic_prefix, ev0)
        wait_for(lambda: srv.replica.engine.version == 0, 60, "the rollback to version 0")
        sd = srv.replica.engine.model.state_dict()
        assert all(torch.equal(sd[k], v0[k]) for k in v0)

        # --- 4. republish v1: a replica started now reads the topic from the start -----
        _produce(kafka_bootstrap, topic_prefix, ev1.model_copy(update={"event_id": "again-1"}))
        wait_for(lambda: srv.replica.engine.version == 1, 60, "version 1 again")
        late = settings.model_copy(update={"replica_id": "swap-b"})
        with ServerThread(late) as srv_b:
            wait_for(lambda: srv_b.replica.engine.version == 1, 60, "the late replica to catch up")

    # Events say which version produced what; status reports the versions and the error.
    gens = consume(
        kafka_bootstrap,
        GENERATIONS.full_name(topic_prefix),
        GenerationEvent,
        lambda evs: {e.generation_id for e in evs} >= {g for g, _ in results},
        timeout_s=30,
    )
    by_id = {e.generation_id: e.policy_version for e in gens}
    assert all(by_id[g] == v for g, v in results)
    statuses = consume(
        kafka_bootstrap,
        REPLICA_STATUS.full_name(topic_prefix),
        ReplicaStatusEvent,
        lambda evs: any(s.state == "stopped" and s.replica_id == "swap-a" for s in evs),
        timeout_s=30,
    )
    mine = [s for s in statuses if s.replica_id == "swap-a"]
    assert {s.version for s in mine if s.state == "serving"} >= {0, 1}
    assert any(s.state == "error" and s.version == 1 and "version 2" in (s.error or "") for s in mine)


def test_the_transformers_engine_refuses_non_finite_weights(tiny_model_dir: Path) -> None:
    import torch

    from services.serving.engines.transformers import TransformersEngine
    from services.serving.settings import ServingSettings

    engine = TransformersEngine(ServingSettings(model_dir=tiny_model_dir, model_name=MODEL))
    before = {k: v.clone() for k, v in engine.state_dict().items()}
    name = next(k for k, v in before.items() if v.is_floating_point())
    for bad in (float("nan"), float("inf")):
        weights = dict(before, **{name: before[name].clone().fill_(bad)})
        with pytest.raises(ValueError, match=f"{name}: contains NaN or infinite values"):
            engine.swap_weights(7, weights)
    assert engine.version == 0
    assert all(torch.equal(v, before[k]) for k, v in engine.state_dict().items())
