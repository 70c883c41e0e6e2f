"""The checkpoint store: published model versions on a filesystem, checksummed.

Layout under the root (one folder per model, the name percent-quoted):

    <model>/0000000007.delta          artifact (or .safetensors for a full snapshot)
    <model>/0000000007.json           manifest: the ModelUpdateEvent, written LAST

Publishing order (a reader never sees half an artifact):
1. encode the artifact (full safetensors, or a delta against the parent version);
2. write it to a temporary file, fsync, rename it into place;
3. write the manifest the same way; its presence is what `has_version` checks;
4. return the ModelUpdateEvent for the caller to produce on model-updates.v1.
A crash before step 3 leaves an orphan artifact that the next publish of that version
overwrites; it is never read, because nothing reads an artifact without its manifest.

`materialize` rebuilds bit-exact weights: it walks the delta chain back to the nearest
full snapshot (or to weights the caller already has), checks the sha256 of every
artifact's bytes and of every reconstructed version, and raises `CorruptArtifact` on any
mismatch, a missing file or an undecodable delta.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from schemas.codec import InvalidEvent, decode, encode
from schemas.events import ArtifactKind, ModelUpdateEvent
from services.checkpoints import delta as deltacodec

VERSION_DIGITS = 10


class CorruptArtifact(Exception):
    """An artifact that cannot be trusted: checksum mismatch, missing file, a path
    outside the store, or a delta that does not decode or apply."""


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary sibling, fsync, rename, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unshare(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses shared ones)."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        t = t.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


class CheckpointStore:
    """Published versions of models' weights in a local directory (an fsspec URL later)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    # --- paths ---
    def _model_dir(self, model: str) -> Path:
        if not model or model in (".", "..") or "\0" in model:
            raise ValueError(f"model: invalid name {model!r}")
        return self.root / quote(model, safe="")

    def _manifest_path(self, model: str, version: int) -> Path:
        if version < 0:
            raise ValueError(f"version: must be >= 0, got {version}")
        return self._model_dir(model) / f"{version:0{VERSION_DIGITS}d}.json"

    def resolve(self, artifact_url: str) -> Path:
        """The file an artifact_url names, inside the root; CorruptArtifact for absolute
        paths, other schemes, `..` traversal or symlinks that lead outside."""
        if not artifact_url or "\0" in artifact_url or "\\" in artifact_url:
            raise CorruptArtifact(f"invalid artifact_url {artifact_url!r}")
        parts = urlsplit(artifact_url)
        if parts.scheme or parts.netloc or artifact_url.startswith("/"):
            raise CorruptArtifact(f"artifact_url must be a path relative to the store: {artifact_url!r}")
        if any(p in ("..", ".", "") for p in artifact_url.split("/")):
            raise CorruptArtifact(f"artifact_url must not contain empty, . or .. parts: {artifact_url!r}")
        path = (self.root / artifact_url).resolve()
        if not path.is_relative_to(self.root):
            raise CorruptArtifact(f"artifact_url leads outside the store: {artifact_url!r}")
        return path

    # --- reading ---
    def has_version(self, model: str, version: int) -> bool:
        """Whether `version` of `model` is completely published (its manifest exists)."""
        return self._manifest_path(model, version).is_file()

    def versions(self, model: str) -> list[int]:
        """Every published version of `model`, ascending."""
        folder = self._model_dir(model)
        if not folder.is_dir():
            return []
        out = [int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit() and not p.name.startswith(".")]
        return sorted(out)

    def latest_version(self, model: str) -> int | None:
        """The highest published version of `model`, or None."""
        versions = self.versions(model)
        return versions[-1] if versions else None

    def manifest(self, model: str, version: int) -> ModelUpdateEvent:
        """The ModelUpdateEvent recorded for a published version."""
        path = self._manifest_path(model, version)
        try:
            return decode(ModelUpdateEvent, path.read_bytes())
        except FileNotFoundError:
            raise CorruptArtifact(f"{model} version {version} is not in the store") from None
        except InvalidEvent as exc:
            raise CorruptArtifact(f"{model} version {version}: bad manifest: {exc}") from None

    def _read_artifact(self, event: ModelUpdateEvent) -> bytes:
        path = self.resolve(event.artifact_url)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CorruptArtifact(f"{event.model} v{event.version}: cannot read {event.artifact_url}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != event.sha256:
            raise CorruptArtifact(f"{event.model} v{event.version}: sha256 of {event.artifact_url} does not match")
        return data

    def materialize(
        self, model: str, version: int, have: tuple[int, dict[str, torch.Tensor]] | None = None
    ) -> dict[str, torch.Tensor]:
        """Bit-exact weights of `version`, verified; raises CorruptArtifact.

        `have` is (version, weights) the caller already holds: when that version lies on
        the delta chain of `version`, the walk stops there instead of at a full snapshot
        (the weights are checked against that version's manifest before use)."""
        chain: list[ModelUpdateEvent] = []
        current = version
        start: dict[str, torch.Tensor] | None = None
        seen: set[int] = set()
        while True:
            if current in seen:
                raise CorruptArtifact(f"{model}: delta chain loops at version {current}")
            seen.add(current)
            event = self.manifest(model, current)
            if event.version != current or event.model != model:
                raise CorruptArtifact(f"{model} v{current}: manifest names {event.model} v{event.version}")
            if (
                have is not None
                and have[0] == current
                and event.weights_sha256 is not None
                and deltacodec.weights_sha256(have[1]) == event.weights_sha256
            ):
                start = dict(have[1])
                break
            chain.append(event)
            if event.artifact_kind == ArtifactKind.FULL:
                break
            if event.base_version is None:
                raise CorruptArtifact(f"{model} v{current}: delta without base_version")
            current = event.base_version
        weights = start
        for event in reversed(chain):
            data = self._read_artifact(event)
            if event.artifact_kind == ArtifactKind.FULL:
                try:
                    weights = st_load(data)
                except Exception as exc:
                    raise CorruptArtifact(f"{model} v{event.version}: undecodable safetensors: {exc}") from None
            else:
                assert weights is not None
                try:
                    weights = deltacodec.apply(weights, data, verify_base=False, verify_result=False)
                except deltacodec.DeltaError as exc:
                    raise CorruptArtifact(f"{model} v{event.version}: {exc}") from None
            if event.weights_sha256 is not None and deltacodec.weights_sha256(weights) != event.weights_sha256:
                raise CorruptArtifact(f"{model} v{event.version}: reconstructed weights fail their checksum")
        assert weights is not None
        return weights

    # --- writing ---
    def publish(
        self,
        model: str,
        version: int,
        state_dict: dict[str, torch.Tensor],
        *,
        parent_version: int | None,
        full: bool,
        eval_metrics: dict[str, float] | None = None,
        parent_weights: dict[str, torch.Tensor] | None = None,
    ) -> ModelUpdateEvent:
        """Write `version` (a full snapshot, or a lossless delta against parent_version,
        which must be in the store) and return the event to produce on model-updates.v1.

        `parent_weights` spares reading the parent back from the store when the caller
        holds it; it is checked against the parent's manifest checksum."""
        if self.has_version(model, version):
            raise ValueError(f"{model} version {version} is already published; versions are immutable")
        folder = self._model_dir(model)
        folder.mkdir(parents=True, exist_ok=True)
        weights = _unshare(state_dict)
        weights_sha = deltacodec.weights_sha256(weights)
        stem = f"{version:0{VERSION_DIGITS}d}"
        if full:
            data = st_save(weights, metadata={"model": model, "version": str(version)})
            name, kind, base = f"{stem}.safetensors", ArtifactKind.FULL, None
        else:
            if parent_version is None or not self.has_version(model, parent_version):
                raise ValueError(f"a delta needs a parent version in the store, got {parent_version}")
            parent_event = self.manifest(model, parent_version)
            parent_sha = None
            if parent_weights is not None:
                parent_sha = deltacodec.weights_sha256(parent_weights)
                if parent_sha != parent_event.weights_sha256:
                    parent_weights = None
            if parent_weights is None:
                parent_weights = self.materialize(model, parent_version)
                parent_sha = parent_event.weights_sha256
            data = deltacodec.encode(parent_weights, weights, old_sha256=parent_sha, new_sha256=weights_sha)
            name, kind, base = f"{stem}.delta", ArtifactKind.DELTA, parent_version
        _write_atomic(folder / name, data)
        event = ModelUpdateEvent(
            model=model,
            version=version,
            parent_version=parent_version,
            artifact_kind=kind,
            artifact_url=f"{folder.name}/{name}",
            base_version=base,
            sha256=hashlib.sha256(data).hexdigest(),
            weights_sha256=weights_sha,
            size_bytes=len(data),
            eval_metrics=eval_metrics or {},
        )
        # The other kind of artifact for this version, left by an earlier crashed attempt.
        other = folder / (f"{stem}.delta" if full else f"{stem}.safetensors")
        with contextlib.suppress(FileNotFoundError):
            other.unlink()
        _write_atomic(self._manifest_path(model, version), encode(event))
        return event
