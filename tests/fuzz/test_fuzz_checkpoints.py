"""Hostile checkpoint artifacts and references against the store's public API
(CheckpointStore, CorruptArtifact, materialize, manifest, resolve).

Forged, corrupt and truncated artifacts, wrong checksums, looping delta chains and path
traversal in artifact references all end in CorruptArtifact (never another exception,
never weights that fail their checksum, never a read outside the store). Manifests are
forged through the layout the store documents: `<model>/<10-digit version>.json`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from services.checkpoints import delta
from services.checkpoints.store import CheckpointStore, CorruptArtifact
from tests.fuzz.corpus_files import fuzz_settings

MODEL = "chaos-policy"

TRAVERSALS = [
    "../outside.safetensors",
    "../../../../etc/passwd",
    "/etc/passwd",
    "file:///etc/passwd",
    "file://localhost/etc/passwd",
    "s3://another-bucket/x.safetensors",
    "http://127.0.0.1:1/x",
    "chaos-policy/../../outside.safetensors",
    "chaos-policy/./0000000000.safetensors",
    "%2e%2e/outside.safetensors",
    "%252e%252e/outside.safetensors",
    "chaos-policy%2f..%2f..%2foutside.safetensors",
    "..\\outside.safetensors",
    "chaos-policy\\..\\..\\outside.safetensors",
    "chaos-policy/0000000000.safetensors\x00.json",
    "chaos-policy//0000000000.safetensors",
    "chaos-policy/0000000000.safetensors?x=1",
    "chaos-policy/0000000000.safetensors#frag",
    "",
    ".",
    "..",
]


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(8, 4, generator=g), "b": torch.randn(16, generator=g)}


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    s = CheckpointStore(tmp_path / "store")
    s.publish(MODEL, 0, _weights(0), parent_version=None, full=True)
    s.publish(MODEL, 1, _weights(1), parent_version=0, full=False)
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    return s


def _manifest_path(root: Path, version: int) -> Path:
    return root / MODEL / f"{version:010d}.json"


def _forge(root: Path, version: int, **over: object) -> dict:
    """A manifest for `version`, copied from version 1's with fields replaced."""
    fields = orjson.loads(_manifest_path(root, 1).read_bytes()) | {"version": version} | over
    _manifest_path(root, version).write_bytes(orjson.dumps(fields))
    return fields


def _root(store: CheckpointStore, tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.mark.parametrize("url", TRAVERSALS)
def test_path_traversal_in_artifact_references_is_refused(store: CheckpointStore, url: str) -> None:
    with pytest.raises(CorruptArtifact):
        store.resolve(url)


@pytest.mark.parametrize("url", TRAVERSALS)
def test_forged_manifest_with_a_traversal_url_is_refused(store: CheckpointStore, tmp_path: Path, url: str) -> None:
    root = _root(store, tmp_path)
    _forge(root, 2, artifact_kind="full", base_version=None, sha256=hashlib.sha256(b"secret").hexdigest())
    fields = orjson.loads(_manifest_path(root, 2).read_bytes())
    fields["artifact_url"] = url or "x"
    _manifest_path(root, 2).write_bytes(orjson.dumps(fields))
    with pytest.raises(CorruptArtifact):
        store.materialize(MODEL, 2)


def test_symlink_out_of_the_store_is_refused(store: CheckpointStore, tmp_path: Path) -> None:
    root = _root(store, tmp_path)
    link = root / MODEL / "0000000002.safetensors"
    link.symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CorruptArtifact):
        store.resolve(f"{MODEL}/0000000002.safetensors")


def _artifact(root: Path, version: int) -> Path:
    (path,) = [p for p in (root / MODEL).glob(f"{version:010d}.*") if p.suffix != ".json"]
    return path


@pytest.mark.parametrize(
    "damage",
    ["truncate", "empty", "flip", "append", "delete", "garbage_with_its_sha", "wrong_sha", "other_version"],
)
@pytest.mark.parametrize("version", [0, 1], ids=["full", "delta"])
def test_corrupt_or_forged_artifacts_raise_corrupt_artifact(
    store: CheckpointStore, tmp_path: Path, damage: str, version: int
) -> None:
    root = _root(store, tmp_path)
    path = _artifact(root, version)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "flip":
        path.write_bytes(data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:])
    elif damage == "append":
        path.write_bytes(data + b"\x00")
    elif damage == "delete":
        path.unlink()
    elif damage == "garbage_with_its_sha":  # a forger who also rewrites the manifest's sha
        garbage = b"\x89not safetensors nor a delta" * 10
        path.write_bytes(garbage)
        fields = orjson.loads(_manifest_path(root, version).read_bytes())
        fields |= {"sha256": hashlib.sha256(garbage).hexdigest(), "size_bytes": len(garbage)}
        _manifest_path(root, version).write_bytes(orjson.dumps(fields))
    elif damage == "wrong_sha":
        fields = orjson.loads(_manifest_path(root, version).read_bytes()) | {"sha256": "0" * 64}
        _manifest_path(root, version).write_bytes(orjson.dumps(fields))
    elif damage == "other_version":
        fields = orjson.loads(_manifest_path(root, version).read_bytes()) | {"version": version + 7}
        _manifest_path(root, version).write_bytes(orjson.dumps(fields))
    with pytest.raises(CorruptArtifact):
        store.materialize(MODEL, 1)


@pytest.mark.parametrize(
    "manifest",
    [b"", b"{", b"[]", b"null", b'{"model": "chaos-policy"}', b"\xff\xfe", b"[" * 100_000],
    ids=["empty", "truncated", "array", "null", "partial", "utf8", "deep"],
)
def test_garbage_manifests_raise_corrupt_artifact(store: CheckpointStore, tmp_path: Path, manifest: bytes) -> None:
    _manifest_path(_root(store, tmp_path), 1).write_bytes(manifest)
    with pytest.raises(CorruptArtifact):
        store.materialize(MODEL, 1)
    with pytest.raises(CorruptArtifact):
        store.manifest(MODEL, 1)


def test_delta_chain_loops_and_missing_bases_raise_corrupt_artifact(store: CheckpointStore, tmp_path: Path) -> None:
    root = _root(store, tmp_path)
    _forge(root, 2, base_version=3, parent_version=3)
    _forge(root, 3, base_version=2, parent_version=2)
    with pytest.raises(CorruptArtifact):
        store.materialize(MODEL, 3)
    _forge(root, 4, base_version=99, parent_version=99)
    with pytest.raises(CorruptArtifact):
        store.materialize(MODEL, 4)
    with pytest.raises(CorruptArtifact):
        store.materialize(MODEL, 50)  # never published


@given(data=st.data())
def test_random_damage_never_yields_wrong_weights(tmp_path_factory, data) -> None:
    root = tmp_path_factory.mktemp("store")
    store = CheckpointStore(root)
    w0, w1 = _weights(0), _weights(1)
    store.publish(MODEL, 0, w0, parent_version=None, full=True)
    store.publish(MODEL, 1, w1, parent_version=0, full=False)
    version = data.draw(st.sampled_from([0, 1]))
    path = _artifact(root, version)
    raw = bytearray(path.read_bytes())
    n = data.draw(st.integers(1, 8))
    for _ in range(n):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    path.write_bytes(bytes(raw[:cut]))
    try:
        got = store.materialize(MODEL, 1)
    except CorruptArtifact:
        return
    assert delta.weights_sha256(got) == delta.weights_sha256(w1)  # damage that changed nothing


test_random_damage_never_yields_wrong_weights = fuzz_settings()(test_random_damage_never_yields_wrong_weights)
