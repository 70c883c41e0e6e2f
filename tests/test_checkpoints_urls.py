"""The checkpoint store on fsspec URLs (`memory://`), its path rules on hostile input,
and the settings that locate it (RLFEED_CHECKPOINT_DIR, RLFEED_CHECKPOINT_S3_*)."""

from __future__ import annotations

import hashlib
import posixpath
import uuid
from pathlib import Path
from urllib.parse import unquote

import fsspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import encode
from schemas.events import ArtifactKind, ModelUpdateEvent
from services.checkpoints import delta
from services.checkpoints.store import (
    CheckpointStore,
    CorruptArtifact,
    artifact_key,
    model_folder,
    parse_location,
)
from services.config import RlfeedSettings
from services.rewardmodel.settings import RewardModelSettings
from services.serving.settings import ServingSettings
from services.trainer.settings import TrainerSettings

MODEL = "org/tiny-policy"
ROOT = "s3://bucket/prefix"


def _step(w: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in w.items()}
    out["a"] += 1e-3 * torch.randn(out["a"].shape, generator=g)
    out["b"].view(-1)[seed] = float(seed)
    return out


@pytest.fixture
def mem_url() -> str:
    """A fresh root in fsspec's process-wide memory filesystem."""
    name = f"rlfeed-test-{uuid.uuid4().hex[:12]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    for root in (f"/{name}", f"/{name}-outside"):
        if fs.exists(root):
            fs.rm(root, recursive=True)


@pytest.fixture
def mem_chain(mem_url: str) -> tuple[CheckpointStore, list[dict[str, torch.Tensor]]]:
    store = CheckpointStore(mem_url)
    w0 = {"a": torch.randn(32, 16), "b": torch.zeros(100), "tied": torch.ones(3)}
    w0["tied2"] = w0["tied"]
    versions = [w0]
    store.publish(MODEL, 0, w0, parent_version=None, full=True)
    for v in range(1, 6):
        versions.append(_step(versions[-1], v))
        store.publish(MODEL, v, versions[-1], parent_version=v - 1, full=(v == 3))
    return store, versions


# --- where a store lives ------------------------------------------------------------------
def test_parse_location(tmp_path: Path) -> None:
    assert parse_location(tmp_path) == ("file", str(tmp_path.resolve()))
    assert parse_location(str(tmp_path)) == ("file", str(tmp_path.resolve()))
    assert parse_location(tmp_path.as_uri()) == ("file", str(tmp_path.resolve()))
    assert parse_location("relative/dir") == ("file", str(Path("relative/dir").resolve()))
    assert parse_location("s3://bucket/prefix/") == ("s3", "bucket/prefix")
    assert parse_location("S3://bucket") == ("s3", "bucket")
    assert parse_location("memory://x") == ("memory", "x")
    for bad in ("", "s3://", "s3://b/p?versionId=1", "file://evil.example/etc", "1x://a", "a\0b"):
        with pytest.raises(ValueError, match="checkpoint_dir"):
            parse_location(bad)


def test_a_url_collapsed_by_a_path_setting_is_refused() -> None:
    with pytest.raises(ValueError, match=r"checkpoint_dir: .*collapsed"):
        CheckpointStore(Path("s3://bucket/prefix"))


def test_local_store_keeps_its_path_api(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path.as_uri())
    assert store.root == tmp_path.resolve() and store.url == tmp_path.resolve().as_uri()
    ev = store.publish("m", 0, {"a": torch.ones(2)}, parent_version=None, full=True)
    assert store.resolve(ev.artifact_url) == tmp_path.resolve() / "m" / "0000000000.safetensors"
    # The same artifact named by this store's own URL is accepted; another directory's is not.
    assert store.resolve(f"{store.url}/{ev.artifact_url}") == store.resolve(ev.artifact_url)
    with pytest.raises(CorruptArtifact, match="artifact_url"):
        store.resolve(f"{tmp_path.parent.as_uri()}/m/0000000000.safetensors")


# --- the path rules -----------------------------------------------------------------------
def test_model_folder() -> None:
    assert model_folder("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert model_folder("org/tiny-policy") == "org%2Ftiny-policy"
    assert model_folder("a b:c") == "a%20b%3Ac"
    for bad in ("", ".", "..", "a\0b", "a\nb", "x" * 201, "%2E%2E", "%2e%2e%2fetc", "..%2F", "a%5Cb"):
        with pytest.raises(CorruptArtifact, match=r"^model: "):
            model_folder(bad)


@pytest.mark.parametrize(
    "url",
    [
        "m/0000000001.delta",
        "org%2Ftiny-policy/0000000001.safetensors",
        f"{ROOT}/m/0000000001.delta",
        "a~b_c.d-e/1.delta",
    ],
)
def test_artifact_key_accepts_keys_inside_the_store(url: str) -> None:
    assert artifact_key(url, (ROOT,)) == url.removeprefix(f"{ROOT}/")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "/etc/passwd",
        "../x",
        "m/../../x",
        "m/..",
        "./m",
        "a//b",
        "a/b/c",
        "m",
        "m/",
        "C:/x",
        "//host/m/x",
        "file:///etc/passwd",
        "s3://other-bucket/m/0000000001.delta",
        "s3://bucket/prefix-evil/m/0000000001.delta",
        "s3://bucket/m/0000000001.delta",
        "s3://bucket/prefix/../outside/x.delta",
        "S3://bucket/prefix/m/0000000001.delta",
        "http://169.254.169.254/latest/meta-data",
        "memory://bucket/prefix/m/1.delta",
        "%2e%2e/%2e%2e",
        "m/%2E%2E",
        "m/%252e%252e",
        "m/%25252e%25252e",
        "..%2F..%2Fetc/passwd",
        "m%2F..%2F..%2Fx/1.delta",
        "m/x\0.delta",
        "m/x%00.delta",
        "m/x%0a.delta",
        "m\\x",
        "m/x%5C..%5Cy",
        "m/x?versionId=1",
        "m/x#frag",
        "m/\u2024\u2024",
        "m/%ff%fe",
        "m/x y",
        "m/" + "x" * 2100,
    ],
)
def test_artifact_key_refuses_everything_else(url: str) -> None:
    with pytest.raises(CorruptArtifact, match=r"^artifact_url: "):
        artifact_key(url, (ROOT,))


def _fully_decoded(key: str) -> str:
    for _ in range(10):
        key = unquote(key)
    return key


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet="./\\%25eEfF2cC:sS3m0x~-\0?#", max_size=40))
def test_no_key_leaves_the_root(url: str) -> None:
    """Whatever comes in, a key that passes stays under the root, even decoded."""
    try:
        key = artifact_key(url, (ROOT,))
    except CorruptArtifact:
        return
    for form in (key, _fully_decoded(key)):
        assert "\0" not in form and "\\" not in form
        assert posixpath.normpath(f"/root/{form}").startswith("/root/")
        assert len(posixpath.normpath(f"/root/{form}").split("/")) >= 4  # /root/<folder>/<file>


# --- a memory:// store --------------------------------------------------------------------
def test_memory_store_publishes_and_materializes_bit_exact(mem_chain) -> None:
    store, versions = mem_chain
    assert store.root == store.url and store.url.startswith("memory://")
    assert store.versions(MODEL) == [0, 1, 2, 3, 4, 5] and store.latest_version(MODEL) == 5
    for v, w in enumerate(versions):
        assert delta.weights_sha256(store.materialize(MODEL, v)) == delta.weights_sha256(w)
    ev = store.manifest(MODEL, 4)
    assert ev.artifact_url == "org%2Ftiny-policy/0000000004.delta" and ev.artifact_kind == ArtifactKind.DELTA
    assert store.resolve(ev.artifact_url) == f"{store.url}/org%2Ftiny-policy/0000000004.delta"
    got = store.materialize(MODEL, 2, have=(1, versions[1]))
    assert delta.weights_sha256(got) == delta.weights_sha256(versions[2])
    assert store.versions("another-model") == [] and store.latest_version("another-model") is None
    with pytest.raises(ValueError, match="already published"):
        store.publish(MODEL, 5, versions[5], parent_version=4, full=False)


def test_memory_store_writes_the_manifest_last(mem_url: str) -> None:
    store = CheckpointStore(mem_url)
    fs = store._files.fs
    written: list[tuple[str, bool]] = []
    original = fs.pipe_file

    def record(path: str, data: bytes, **kw) -> None:
        version = int(path.rsplit("/", 1)[1].split(".")[0])
        written.append((path.rsplit("/", 1)[1], store.has_version("m", version)))
        original(path, data, **kw)

    fs.pipe_file = record
    try:
        store.publish("m", 0, {"a": torch.ones(4)}, parent_version=None, full=True)
        store.publish("m", 1, {"a": torch.ones(4) * 2}, parent_version=0, full=False)
    finally:
        del fs.pipe_file
    # Artifact first, manifest last; the version is invisible until the manifest is written.
    assert written == [
        ("0000000000.safetensors", False),
        ("0000000000.json", False),
        ("0000000001.delta", False),
        ("0000000001.json", False),
    ]
    assert store.has_version("m", 1)


def test_memory_store_detects_corrupt_and_missing_objects(mem_chain) -> None:
    store, versions = mem_chain
    fs = store._files.fs
    path = fs._strip_protocol(store.resolve(store.manifest(MODEL, 2).artifact_url))
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x40
    fs.pipe_file(path, bytes(data))
    with pytest.raises(CorruptArtifact, match="sha256"):
        store.materialize(MODEL, 2)
    assert delta.weights_sha256(store.materialize(MODEL, 4)) == delta.weights_sha256(versions[4])
    fs.rm_file(path)
    with pytest.raises(CorruptArtifact, match="cannot read"):
        store.materialize(MODEL, 2)
    with pytest.raises(CorruptArtifact, match="not in the store"):
        store.materialize(MODEL, 9)


def _forge_manifest(store: CheckpointStore, version: int, artifact_url: str, data: bytes) -> None:
    """A manifest as a hostile writer would leave it: right checksums, a bad artifact_url."""
    ev = ModelUpdateEvent(
        model=MODEL,
        version=version,
        artifact_kind=ArtifactKind.FULL,
        artifact_url=artifact_url,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
    )
    store._files.write(f"{model_folder(MODEL)}/{version:010d}.json", encode(ev))


@pytest.mark.parametrize(
    "url",
    [
        "../{name}-outside/secret.safetensors",
        "memory:///{name}-outside/secret.safetensors",
        "memory://{name}-outside/secret.safetensors",
        "%2e%2e/{name}-outside%2Fsecret.safetensors",
        "org%2Ftiny-policy/..%2F..%2F{name}-outside%2Fsecret.safetensors",
    ],
)
def test_a_forged_manifest_cannot_read_outside_the_root(mem_url: str, url: str) -> None:
    store = CheckpointStore(mem_url)
    name = mem_url.removeprefix("memory://")
    secret = encode_weights({"a": torch.ones(3)})
    fs = store._files.fs
    fs.pipe_file(f"/{name}-outside/secret.safetensors", secret)
    _forge_manifest(store, 7, url.format(name=name), secret)
    read: list[str] = []
    original = fs.cat_file
    fs.cat_file = lambda path, *a, **kw: read.append(path) or original(path, *a, **kw)
    try:
        with pytest.raises(CorruptArtifact, match="artifact_url: "):
            store.materialize(MODEL, 7)
    finally:
        del fs.cat_file
    assert read and all(p.startswith(f"/{name}/") for p in read)


def test_a_forged_manifest_naming_this_store_by_url_is_served(mem_url: str) -> None:
    store = CheckpointStore(mem_url)
    weights = {"a": torch.arange(6.0)}
    data = encode_weights(weights)
    store._files.write("org%2Ftiny-policy/elsewhere.safetensors", data)
    _forge_manifest(store, 3, f"{mem_url}/org%2Ftiny-policy/elsewhere.safetensors", data)
    assert torch.equal(store.materialize(MODEL, 3)["a"], weights["a"])


def test_check_event_names_the_bad_field(mem_chain) -> None:
    store, _ = mem_chain
    good = store.manifest(MODEL, 4)
    assert store.check_event(good) == "org%2Ftiny-policy/0000000004.delta"
    raw = good.model_dump()
    with pytest.raises(CorruptArtifact, match=r"^artifact_url: "):
        store.check_event(ModelUpdateEvent(**{**raw, "artifact_url": "s3://elsewhere/org%2Ftiny-policy/4.delta"}))
    with pytest.raises(CorruptArtifact, match=r"^model: "):
        store.check_event(ModelUpdateEvent(**{**raw, "model": ".."}))


@pytest.mark.parametrize("model", ["..", "../x", "%2e%2e", "a\0b", ""])
def test_hostile_model_names_are_refused_on_every_call(mem_url: str, model: str) -> None:
    store = CheckpointStore(mem_url)
    for call in (
        lambda: store.has_version(model, 1),
        lambda: store.versions(model),
        lambda: store.materialize(model, 1),
        lambda: store.publish(model, 0, {"a": torch.ones(1)}, parent_version=None, full=True),
    ):
        with pytest.raises(CorruptArtifact, match=r"^model: "):
            call()
    assert fsspec.filesystem("memory").find(f"/{mem_url.removeprefix('memory://')}") == []


def encode_weights(weights: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(weights)


# --- settings -----------------------------------------------------------------------------
def test_every_store_setting_takes_a_url_or_a_path(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RLFEED_CHECKPOINT_DIR", "s3://bucket/prefix")
    assert ServingSettings().resolved_checkpoint_dir == "s3://bucket/prefix"
    assert TrainerSettings().checkpoint_dir == "s3://bucket/prefix"
    assert RewardModelSettings().store_dir == "s3://bucket/prefix"
    monkeypatch.delenv("RLFEED_CHECKPOINT_DIR")
    assert ServingSettings(checkpoint_dir=tmp_path).checkpoint_dir == str(tmp_path)
    assert TrainerSettings(home_dir=tmp_path).checkpoint_dir == str(tmp_path / "checkpoints")
    assert CheckpointStore(TrainerSettings(home_dir=tmp_path).checkpoint_dir).root == (tmp_path / "checkpoints")


def test_s3_options_come_from_the_settings(monkeypatch) -> None:
    assert RlfeedSettings().checkpoint_storage_options() == {}
    monkeypatch.setenv("RLFEED_CHECKPOINT_S3_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("RLFEED_CHECKPOINT_S3_REGION", "eu-west-3")
    monkeypatch.setenv("RLFEED_CHECKPOINT_S3_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("RLFEED_CHECKPOINT_S3_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    s = ServingSettings()
    assert s.checkpoint_storage_options() == {
        "client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "eu-west-3"},
        "key": "AKIDEXAMPLE",
        "secret": "wJalrXUtnFEMI",
    }
    assert "wJalrXUtnFEMI" not in repr(s) and "AKIDEXAMPLE" not in repr(s)
    fs = CheckpointStore(f"s3://bucket-{uuid.uuid4().hex[:8]}/p")._files.fs  # connects lazily: no request
    assert fs.client_kwargs["endpoint_url"] == "http://minio:9000" and fs.key == "AKIDEXAMPLE"
    monkeypatch.delenv("RLFEED_CHECKPOINT_S3_SECRET_ACCESS_KEY")
    with pytest.raises(ValueError, match="checkpoint_s3_access_key_id and checkpoint_s3_secret_access_key"):
        ServingSettings()
