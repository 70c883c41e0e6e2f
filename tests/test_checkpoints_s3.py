"""The checkpoint store on a real S3-protocol server on loopback (moto's server, through
s3fs and botocore over HTTP): the trainer publishes the tiny model's weights as full
snapshots and deltas, a replica configured only by RLFEED_ variables materializes them
bit-exactly, a corrupted object is refused, and no artifact_url reaches outside the
store's prefix, not even another object of the same bucket with the right checksum. And
a real serving replica, fed by the broker, hot-swaps from that store and refuses a forged
update that points outside it."""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import torch
from moto.server import ThreadedMotoServer
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from schemas.codec import encode
from schemas.events import ArtifactKind, ModelUpdateEvent
from services.checkpoints import delta
from services.checkpoints.store import CheckpointStore, CorruptArtifact
from services.serving.settings import ServingSettings
from services.trainer.settings import TrainerSettings

MODEL = "org/tiny-policy"
FOLDER = "org%2Ftiny-policy"
KEY_ID, SECRET = "rlfeed-test-key", "rlfeed-test-secret"


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port), for this module."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(s3_endpoint: str, monkeypatch, tmp_path: Path) -> tuple[str, Any]:
    """A fresh bucket, and the RLFEED_ variables that point every process's store into it."""
    name = f"rlfeed-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id=KEY_ID, aws_secret_access_key=SECRET
    )
    client.create_bucket(Bucket=name)
    for var, value in {
        "RLFEED_HOME_DIR": str(tmp_path / "home"),
        "RLFEED_CHECKPOINT_DIR": f"s3://{name}/ckpt",
        "RLFEED_CHECKPOINT_S3_ENDPOINT_URL": s3_endpoint,
        "RLFEED_CHECKPOINT_S3_REGION": "us-east-1",
        "RLFEED_CHECKPOINT_S3_ACCESS_KEY_ID": KEY_ID,
        "RLFEED_CHECKPOINT_S3_SECRET_ACCESS_KEY": SECRET,
    }.items():
        monkeypatch.setenv(var, value)
    return name, client


def _keys(client: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", []))


def _train_step(w: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A sparse, small update of a few tensors, like an optimiser step at a low learning rate."""
    g = torch.Generator().manual_seed(seed)
    out = dict(w)
    for name in sorted(w)[seed % 3 :: 4]:
        t = w[name].clone()
        mask = torch.rand(t.shape, generator=g) < 0.05
        t[mask] += 1e-4 * torch.randn(t.shape, generator=g)[mask]
        out[name] = t
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def published(bucket, tiny_model_dir: Path) -> tuple[str, Any, list[dict[str, torch.Tensor]]]:
    """Versions 0..6 of the tiny model published by a trainer: full 0 and 4, deltas between."""
    name, client = bucket
    settings = TrainerSettings()
    assert settings.checkpoint_dir == f"s3://{name}/ckpt"
    store = CheckpointStore(settings.checkpoint_dir)
    versions = [load_file(tiny_model_dir / "model.safetensors")]
    store.publish(MODEL, 0, versions[0], parent_version=None, full=True)
    for v in range(1, 7):
        versions.append(_train_step(versions[-1], v))
        ev = store.publish(MODEL, v, versions[-1], parent_version=v - 1, full=(v == 4), parent_weights=versions[-2])
        assert ev.artifact_kind == (ArtifactKind.FULL if v == 4 else ArtifactKind.DELTA)
    return name, client, versions


def test_replica_materializes_what_the_trainer_published_bit_exact(published) -> None:
    name, client, versions = published
    replica = CheckpointStore(ServingSettings().resolved_checkpoint_dir)
    assert replica.url == f"s3://{name}/ckpt"
    assert replica.versions(MODEL) == list(range(7))
    for v, w in enumerate(versions):
        got = replica.materialize(MODEL, v)
        assert _same(got, w), v
        assert delta.weights_sha256(got) == replica.manifest(MODEL, v).weights_sha256
    # Following updates: start from the weights it serves, read only the new delta.
    assert _same(replica.materialize(MODEL, 6, have=(5, versions[5])), versions[6])
    # Everything lies under the prefix, two objects per version (artifact, then manifest).
    kinds = {0: "safetensors", 4: "safetensors"}
    assert _keys(client, name) == sorted(
        [f"ckpt/{FOLDER}/{v:010d}.json" for v in range(7)]
        + [f"ckpt/{FOLDER}/{v:010d}.{kinds.get(v, 'delta')}" for v in range(7)]
    )
    # Deltas are much smaller than a full snapshot.
    sizes = {v: replica.manifest(MODEL, v).size_bytes for v in range(7)}
    assert max(sizes[v] for v in (1, 2, 3, 5, 6)) < sizes[0] / 4
    # A version published after the replica listed the folder is seen at once (no stale listing).
    new = _train_step(versions[-1], 7)
    options = {**TrainerSettings().checkpoint_storage_options(), "skip_instance_cache": True}  # another process
    trainer = CheckpointStore(TrainerSettings().checkpoint_dir, storage_options=options)
    assert trainer._files.fs is not replica._files.fs
    trainer.publish(MODEL, 7, new, parent_version=6, full=False)
    assert replica.latest_version(MODEL) == 7 and replica.has_version(MODEL, 7)
    assert _same(replica.materialize(MODEL, 7), new)


def test_a_corrupted_or_missing_object_is_refused(published) -> None:
    name, client, versions = published
    store = CheckpointStore(f"s3://{name}/ckpt")
    key = f"ckpt/{FOLDER}/0000000002.delta"
    data = bytearray(client.get_object(Bucket=name, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    client.put_object(Bucket=name, Key=key, Body=bytes(data))
    for v in (2, 3):  # 3 is a delta on 2
        with pytest.raises(CorruptArtifact, match="sha256"):
            store.materialize(MODEL, v)
    assert _same(store.materialize(MODEL, 6), versions[6])  # its chain starts at the full 4
    client.delete_object(Bucket=name, Key=key)
    with pytest.raises(CorruptArtifact, match="cannot read"):
        store.materialize(MODEL, 3)
    client.delete_object(Bucket=name, Key=f"ckpt/{FOLDER}/0000000005.json")
    assert not store.has_version(MODEL, 5) and store.versions(MODEL) == [0, 1, 2, 3, 4, 6]
    with pytest.raises(CorruptArtifact, match="not in the store"):
        store.materialize(MODEL, 6)


def test_no_artifact_url_reaches_outside_the_prefix(published, s3_endpoint: str) -> None:
    name, client, _ = published
    store = CheckpointStore(f"s3://{name}/ckpt")
    secret = st_save({"a": torch.ones(3)})
    other = f"rlfeed-other-{uuid.uuid4().hex[:8]}"
    client.create_bucket(Bucket=other)
    for bkt, key in (
        (name, "outside/secret.safetensors"),
        (name, "ckpt-evil/x/1.safetensors"),
        (other, "ckpt/x/1.safetensors"),
    ):
        client.put_object(Bucket=bkt, Key=key, Body=secret)
    hostile = [
        "../outside/secret.safetensors",
        "%2e%2e/outside%2Fsecret.safetensors",
        f"{FOLDER}/..%2F..%2Foutside%2Fsecret.safetensors",
        f"s3://{name}/outside/secret.safetensors",
        f"s3://{name}/ckpt/../outside/secret.safetensors",
        f"s3://{name}/ckpt-evil/x/1.safetensors",
        f"s3://{other}/ckpt/x/1.safetensors",
        f"{s3_endpoint}/{name}/outside/secret.safetensors",
        "/outside/secret.safetensors",
    ]
    for i, url in enumerate(hostile):
        version = 100 + i
        ev = ModelUpdateEvent(
            model=MODEL,
            version=version,
            artifact_kind=ArtifactKind.FULL,
            artifact_url=url,
            sha256=hashlib.sha256(secret).hexdigest(),  # the checksum would pass: only the path rule stops it
            size_bytes=len(secret),
        )
        client.put_object(Bucket=name, Key=f"ckpt/{FOLDER}/{version:010d}.json", Body=encode(ev))
        with pytest.raises(CorruptArtifact, match=r"^artifact_url: "):
            store.materialize(MODEL, version)
    # Nor can a model name write outside it.
    before = _keys(client, name)
    for model in ("..", "../outside", "%2e%2e"):
        with pytest.raises(CorruptArtifact, match=r"^model: "):
            store.publish(model, 0, {"a": torch.ones(2)}, parent_version=None, full=True)
    assert _keys(client, name) == before
    assert _keys(client, other) == ["ckpt/x/1.safetensors"]


@pytest.mark.timeout(240)
def test_a_replica_hot_swaps_from_s3_and_refuses_a_forged_update(
    bucket, kafka_bootstrap: str, topic_prefix: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Through the real parts: the broker carries the update events, moto's server holds
    the store, the replica is configured by RLFEED_CHECKPOINT_* variables only."""
    import httpx
    from confluent_kafka import Producer

    from schemas.codec import key_of
    from schemas.topics import MODEL_UPDATES
    from services.kafka.producers import producer_config
    from services.serving.server import ServerThread
    from tests.test_serving_support import wait_for

    name, client = bucket
    model = f"s3-swap-{uuid.uuid4().hex[:6]}"
    trainer = CheckpointStore(TrainerSettings().checkpoint_dir)
    v0 = load_file(tiny_model_dir / "model.safetensors")
    trainer.publish(model, 0, v0, parent_version=None, full=True)
    v1 = _train_step(v0, 1)
    ev1 = trainer.publish(model, 1, v1, parent_version=0, full=False, parent_weights=v0)

    def produce(ev: ModelUpdateEvent) -> None:
        p = Producer(producer_config(kafka_bootstrap))
        p.produce(MODEL_UPDATES.full_name(topic_prefix), value=encode(ev), key=key_of(ev, MODEL_UPDATES.key))
        assert p.flush(30) == 0

    settings = ServingSettings(
        kafka_url=f"kafka://{kafka_bootstrap}",
        topic_prefix=topic_prefix,
        model_dir=tiny_model_dir,
        model_name=model,
        serving_port=0,
        replica_id="s3-swap",
        default_max_tokens=4,
    )
    assert settings.resolved_checkpoint_dir == f"s3://{name}/ckpt"  # from RLFEED_CHECKPOINT_DIR
    with ServerThread(settings) as srv:

        def health() -> dict[str, Any]:
            return httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=30).json()

        wait_for(lambda: srv.replica.follower.caught_up.is_set(), 60, "the follower to catch up")
        produce(ev1)
        wait_for(lambda: srv.replica.engine.version == 1, 90, "version 1 from S3")
        sd = srv.replica.engine.model.state_dict()
        assert all(torch.equal(sd[k], v1[k]) for k in v1)  # bit-exact
        # A forged version 2: its manifest points outside the prefix at bytes whose
        # checksum it carries. The replica refuses it and keeps serving version 1.
        secret = st_save({k: t * 0 for k, t in v1.items()})
        client.put_object(Bucket=name, Key="outside/secret.safetensors", Body=secret)
        forged = ev1.model_copy(
            update={
                "version": 2,
                "parent_version": 1,
                "artifact_kind": ArtifactKind.FULL,
                "base_version": None,
                "artifact_url": "../outside/secret.safetensors",
                "sha256": hashlib.sha256(secret).hexdigest(),
                "weights_sha256": None,
                "size_bytes": len(secret),
                "event_id": f"forged-{uuid.uuid4().hex[:8]}",
            }
        )
        client.put_object(Bucket=name, Key=f"ckpt/{model}/0000000002.json", Body=encode(forged))
        produce(forged)
        wait_for(lambda: health()["last_update_error"] is not None, 90, "the forged update to be refused")
        status = health()
        assert status["policy_version"] == 1 and status["status"] == "ok", status
        assert "artifact_url" in status["last_update_error"], status
        sd = srv.replica.engine.model.state_dict()
        assert all(torch.equal(sd[k], v1[k]) for k in v1)
