"""The checkpoint store: publish full and delta versions, materialize them bit-exactly,
detect corruption, refuse paths outside the store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from schemas.codec import encode
from schemas.events import ArtifactKind
from services.checkpoints import delta
from services.checkpoints.store import CheckpointStore, CorruptArtifact

MODEL = "org/tiny-policy"


def _step(w: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: v.clone() for k, v in w.items()}
    out["a"] += 1e-3 * torch.randn(out["a"].shape, generator=g)
    out["b"].view(-1)[seed] = float(seed)
    return out


@pytest.fixture
def chain(tmp_path: Path) -> tuple[CheckpointStore, list[dict[str, torch.Tensor]]]:
    store = CheckpointStore(tmp_path / "store")
    w0 = {"a": torch.randn(32, 16), "b": torch.zeros(100), "tied": torch.ones(3)}
    w0["tied2"] = w0["tied"]  # shared storage, like tied embeddings
    versions = [w0]
    ev = store.publish(MODEL, 0, w0, parent_version=None, full=True)
    assert ev.artifact_kind == ArtifactKind.FULL and ev.version == 0
    for v in range(1, 6):
        w = _step(versions[-1], v)
        versions.append(w)
        ev = store.publish(MODEL, v, w, parent_version=v - 1, full=(v == 3), eval_metrics={"reward": 0.5})
        assert ev.parent_version == v - 1
        assert ev.artifact_kind == (ArtifactKind.FULL if v == 3 else ArtifactKind.DELTA)
        assert ev.base_version == (None if v == 3 else v - 1)
        assert ev.weights_sha256 == delta.weights_sha256(w)
        assert store.resolve(ev.artifact_url).stat().st_size == ev.size_bytes
    return store, versions


def test_materialize_every_version_bit_exact(chain) -> None:
    store, versions = chain
    assert store.versions(MODEL) == [0, 1, 2, 3, 4, 5]
    assert store.latest_version(MODEL) == 5
    for v, w in enumerate(versions):
        got = store.materialize(MODEL, v)
        assert delta.weights_sha256(got) == delta.weights_sha256(w)
    assert store.manifest(MODEL, 5).eval_metrics == {"reward": 0.5}


def test_materialize_starts_from_weights_the_caller_has(chain, monkeypatch) -> None:
    store, versions = chain
    read: list[str] = []
    original = store._read_artifact
    monkeypatch.setattr(store, "_read_artifact", lambda ev: read.append(ev.artifact_url) or original(ev))
    got = store.materialize(MODEL, 2, have=(1, versions[1]))
    assert delta.weights_sha256(got) == delta.weights_sha256(versions[2])
    assert len(read) == 1 and read[0].endswith("0000000002.delta")
    read.clear()
    # A `have` off the chain (version 4's chain stops at the full snapshot 3) is ignored.
    store.materialize(MODEL, 4, have=(1, versions[1]))
    assert [u.rsplit("/", 1)[1] for u in read] == ["0000000003.safetensors", "0000000004.delta"]
    # Wrong weights claimed as version 1 are not trusted.
    read.clear()
    got = store.materialize(MODEL, 2, have=(1, versions[0]))
    assert delta.weights_sha256(got) == delta.weights_sha256(versions[2])
    assert len(read) == 3


def test_corrupted_artifact_is_detected(chain) -> None:
    store, _ = chain
    path = store.resolve(store.manifest(MODEL, 2).artifact_url)
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifact, match="sha256"):
        store.materialize(MODEL, 2)
    with pytest.raises(CorruptArtifact, match="sha256"):
        store.materialize(MODEL, 2, have=(1, store.materialize(MODEL, 1)))
    path.unlink()
    with pytest.raises(CorruptArtifact, match="cannot read"):
        store.materialize(MODEL, 2)
    assert delta.weights_sha256(store.materialize(MODEL, 4))  # its chain starts at the full snapshot 3


def test_missing_version_and_immutable_versions(chain) -> None:
    store, versions = chain
    assert not store.has_version(MODEL, 9)
    with pytest.raises(CorruptArtifact):
        store.materialize(MODEL, 9)
    with pytest.raises(ValueError, match="already published"):
        store.publish(MODEL, 5, versions[5], parent_version=4, full=False)
    with pytest.raises(ValueError, match="parent"):
        store.publish(MODEL, 6, versions[5], parent_version=42, full=False)


def test_unfinished_publish_is_invisible(chain) -> None:
    store, versions = chain
    # An artifact without its manifest (a crash between the two writes) is not a version.
    folder = store.resolve(store.manifest(MODEL, 5).artifact_url).parent
    (folder / "0000000006.delta").write_bytes(b"half")
    assert not store.has_version(MODEL, 6)
    ev = store.publish(MODEL, 6, _step(versions[5], 6), parent_version=5, full=False)
    assert store.resolve(ev.artifact_url).read_bytes() != b"half"
    assert store.has_version(MODEL, 6)


@pytest.mark.parametrize(
    "url",
    ["/etc/passwd", "../x", "a/../../x", "s3://bucket/x", "file:///etc/passwd", "", "a//b", "./a", "a\\b", "C:/x"],
)
def test_resolve_refuses_paths_outside_the_store(tmp_path: Path, url: str) -> None:
    store = CheckpointStore(tmp_path)
    with pytest.raises(CorruptArtifact):
        store.resolve(url)


def test_resolve_refuses_symlinks_out(tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "link").symlink_to(tmp_path)
    store = CheckpointStore(tmp_path / "store")
    with pytest.raises(CorruptArtifact):
        store.resolve("link/secret")
    assert store.resolve("m/0000000001.delta") == (tmp_path / "store" / "m" / "0000000001.delta").resolve()


def test_materialize_trusts_a_known_checksum_of_have(chain, monkeypatch) -> None:
    """`have_sha256` spares hashing the weights the caller has; it is trusted only as far
    as the result: weights that are not what the caller claims are found out when the
    delta fails on them, and the walk starts over from the store."""
    store, versions = chain
    sha1 = store.manifest(MODEL, 1).weights_sha256
    hashed: list[int] = []
    original = delta.weights_sha256
    monkeypatch.setattr(delta, "weights_sha256", lambda w: hashed.append(1) or original(w))
    read: list[str] = []
    read_artifact = store._read_artifact
    monkeypatch.setattr(store, "_read_artifact", lambda ev: read.append(ev.artifact_url) or read_artifact(ev))
    got = store.materialize(MODEL, 2, have=(1, versions[1]), have_sha256=sha1)
    assert hashed == []  # neither the weights held nor the result were hashed whole
    assert [u.rsplit("/", 1)[1] for u in read] == ["0000000002.delta"]
    assert original(got) == original(versions[2])
    read.clear()
    # A checksum that is not version 1's: `have` is not used, the chain starts at version 0.
    got = store.materialize(MODEL, 2, have=(1, versions[1]), have_sha256="0" * 64)
    assert [u.rsplit("/", 1)[1] for u in read] == ["0000000000.safetensors", "0000000001.delta", "0000000002.delta"]
    assert original(got) == original(versions[2])
    # Weights that are not version 1, claimed to be: the delta fails on them, they are
    # found out by their checksum, and the chain is walked from the store instead.
    read.clear()
    got = store.materialize(MODEL, 2, have=(1, versions[0]), have_sha256=sha1)
    assert original(got) == original(versions[2])
    assert [u.rsplit("/", 1)[1] for u in read] == [
        "0000000002.delta",
        "0000000000.safetensors",
        "0000000001.delta",
        "0000000002.delta",
    ]
    # Missing a tensor (say, a tied one the engine does not list): the same.
    partial = {k: v for k, v in versions[1].items() if k != "b"}
    got = store.materialize(MODEL, 2, have=(1, partial), have_sha256=sha1)
    assert original(got) == original(versions[2])


def _replace_artifact(store: CheckpointStore, version: int, data: bytes, **changes: object) -> None:
    """Overwrite `version`'s artifact with `data` and its manifest to match (sha256, size),
    plus `changes`: a forged but self-consistent version."""
    event = store.manifest(MODEL, version)
    store.resolve(event.artifact_url).write_bytes(data)
    forged = event.model_copy(update={"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data), **changes})
    store.resolve(store._manifest_key(MODEL, version)).write_bytes(encode(forged))


def test_a_delta_made_against_other_weights_is_rejected(chain) -> None:
    """A delta whose header names another base than its base version's manifest, or
    another result than its own manifest, is refused before it is decoded."""
    store, versions = chain
    _replace_artifact(store, 2, delta.encode(versions[0], versions[2]))
    with pytest.raises(CorruptArtifact, match="other weights than its base"):
        store.materialize(MODEL, 2)
    with pytest.raises(CorruptArtifact, match="other weights than its base"):
        store.materialize(MODEL, 2, have=(1, versions[1]))
    sha1 = store.manifest(MODEL, 1).weights_sha256
    with pytest.raises(CorruptArtifact, match="other weights than its base"):  # the weights held are right
        store.materialize(MODEL, 2, have=(1, versions[1]), have_sha256=sha1)
    _replace_artifact(
        store, 2, delta.encode(versions[1], versions[2]), weights_sha256=delta.weights_sha256(versions[3])
    )
    with pytest.raises(CorruptArtifact, match="checksum"):
        store.materialize(MODEL, 2)
    _replace_artifact(
        store, 2, delta.encode(versions[1], versions[2]), weights_sha256=delta.weights_sha256(versions[2])
    )
    assert delta.weights_sha256(store.materialize(MODEL, 2)) == delta.weights_sha256(versions[2])
