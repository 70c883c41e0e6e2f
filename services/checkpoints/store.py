"""The checkpoint store: published model versions under one root, checksummed.

The root is a local directory (a path or a `file://` URL) or any fsspec URL: `s3://bucket/
prefix` on AWS S3 or an S3-compatible server (MinIO, Ceph, R2; s3fs), `memory://name` in
tests, or whatever other fsspec backend is installed (gcs://, az://, ...). For `s3://` the
endpoint, region and keys come from the `RLFEED_CHECKPOINT_S3_*` settings
(services/config.py) unless the caller passes `storage_options`.

Layout under the root (one folder per model, the name percent-quoted):

    <model>/0000000007.delta          artifact (or .safetensors for a full snapshot)
    <model>/0000000007.json           manifest: the ModelUpdateEvent, written LAST

Publishing order (a reader never sees half an artifact):
1. encode the artifact (full safetensors, or a delta against the parent version);
2. write it whole: on a filesystem to a temporary file, fsync, rename into place; on an
   object store with one PUT (or one multipart upload), which S3 makes visible atomically
   when it completes, never partly;
3. write the manifest the same way; its presence is what `has_version` checks;
4. return the ModelUpdateEvent for the caller to produce on model-updates.v1.
A crash before step 3 leaves an orphan artifact that the next publish of that version
overwrites; it is never read, because nothing reads an artifact without its manifest.

`materialize` rebuilds bit-exact weights: it walks the delta chain back to the nearest
full snapshot (or to weights the caller already has), checks the sha256 of every
artifact's bytes and of every reconstructed version, and raises `CorruptArtifact` on any
mismatch, a missing object or an undecodable delta.

Path safety: a model name and an artifact_url come from events and manifests, i.e.
hostile input. `model_folder` and `artifact_key` (pure functions) turn them into keys of
the form `<folder>/<file>` over a small alphabet, and reject, with a CorruptArtifact that
names the field, anything else: absolute paths, other schemes, buckets or prefixes, `.`
and `..` parts (also percent-encoded, however often), backslashes, NUL and other control
characters, queries and fragments. On a local store a symlink leading out of the root is
refused as well. So nothing outside the root can be read or written through either.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from schemas.codec import InvalidEvent, decode, encode
from schemas.events import ArtifactKind, ModelUpdateEvent
from services.checkpoints import delta as deltacodec

VERSION_DIGITS = 10
MAX_URL_CHARS = 2048
"""Longest artifact_url accepted (the ModelUpdateEvent field's own limit)."""
_SEGMENT = re.compile(r"[A-Za-z0-9._~%-]{1,255}")
"""One part of a key: what `quote(..., safe="")` produces (letters, digits, `._~-`, %XX)."""
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_MANGLED_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")
"""`s3://b/p` after a trip through Path (`s3:/b/p`); one-letter schemes are drive letters."""
S3_PROTOCOLS = ("s3", "s3a")


class CorruptArtifact(Exception):
    """An artifact that cannot be trusted: checksum mismatch, missing file, a path
    outside the store, or a delta that does not decode or apply."""


def _shown(value: str, limit: int = 200) -> str:
    """`value` for an error message: repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- pure path rules --------------------------------------------------------------------
def parse_location(root: str | os.PathLike[str]) -> tuple[str, str]:
    """(protocol, path) of a store root: ("file", absolute path) for a local directory
    given as a path or a `file://` URL; otherwise the fsspec protocol and the rest of the
    URL (`s3://bucket/prefix` -> ("s3", "bucket/prefix")). ValueError naming
    checkpoint_dir for a root that cannot be a store."""
    text = os.fspath(root)
    if not text or "\0" in text:
        raise ValueError(f"checkpoint_dir: invalid store location {_shown(text)}")
    if isinstance(root, os.PathLike) and _MANGLED_URL.match(text):
        raise ValueError(
            f"checkpoint_dir: {_shown(text)} is a URL that a Path-typed setting collapsed "
            "(s3://b/p became s3:/b/p); type the setting as services.config.StoreLocation"
        )
    if isinstance(root, os.PathLike) or "://" not in text:
        return "file", str(Path(text).resolve())
    protocol, rest = text.split("://", 1)
    protocol = protocol.lower()
    if not _SCHEME.fullmatch(protocol + ":"):
        raise ValueError(f"checkpoint_dir: invalid URL scheme in {_shown(text)}")
    if "?" in rest or "#" in rest:
        raise ValueError(f"checkpoint_dir: no query or fragment allowed in {_shown(text)}")
    if protocol == "file":
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"checkpoint_dir: file:// URL with a host: {_shown(text)}")
        return "file", str(Path(unquote(parts.path)).resolve())
    rest = rest.rstrip("/")
    if protocol in S3_PROTOCOLS and not rest:
        raise ValueError(f"checkpoint_dir: an s3:// store needs a bucket: {_shown(text)}")
    return protocol, rest


def _check_parts(field: str, key: str, shown: str) -> None:
    """Raise CorruptArtifact unless every `/`-part of `key`, and of its percent-decodings
    (repeated until nothing changes), is a plain name: not empty, `.` or `..`, no
    backslash, NUL or control character."""
    seen = key
    for _ in range(8):
        for part in seen.split("/"):
            if part in ("", ".", ".."):
                raise CorruptArtifact(f"{field}: empty, . or .. path part (maybe percent-encoded) in {shown}")
            if any(c == "\\" or ord(c) < 0x20 or ord(c) == 0x7F for c in part):
                raise CorruptArtifact(f"{field}: backslash or control character (maybe percent-encoded) in {shown}")
        decoded = unquote(seen, errors="strict") if "%" in seen else seen
        if decoded == seen:
            return
        seen = decoded
    raise CorruptArtifact(f"{field}: percent-encoded too many times: {shown}")


def model_folder(model: str) -> str:
    """The folder of `model` under the root (the name percent-quoted); CorruptArtifact
    naming the `model` field for a name that cannot be one."""
    if not isinstance(model, str) or not model or len(model) > 200:
        raise CorruptArtifact(f"model: must be a name of 1 to 200 characters, got {_shown(str(model))}")
    if model in (".", "..") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in model):
        raise CorruptArtifact(f"model: invalid name {_shown(model)}")
    folder = quote(model, safe="")
    if not _SEGMENT.fullmatch(folder):
        raise CorruptArtifact(f"model: name too long once quoted: {_shown(model)}")
    try:
        _check_parts("model", folder, _shown(model))
    except UnicodeDecodeError:
        raise CorruptArtifact(f"model: invalid name {_shown(model)}") from None
    return folder


def artifact_key(artifact_url: str, root_urls: tuple[str, ...] = ()) -> str:
    """The key (`<folder>/<file>`, relative to the root) an artifact_url names.

    Accepted: a relative `<folder>/<file>` (what `publish` writes), or a full URL that
    starts with one of `root_urls` (this store's own root) followed by `/`. Everything
    else raises CorruptArtifact naming the `artifact_url` field."""
    if not isinstance(artifact_url, str) or not artifact_url:
        raise CorruptArtifact("artifact_url: empty")
    shown = _shown(artifact_url)
    if len(artifact_url) > MAX_URL_CHARS:
        raise CorruptArtifact(f"artifact_url: longer than {MAX_URL_CHARS} characters")
    if "\0" in artifact_url or "\\" in artifact_url:
        raise CorruptArtifact(f"artifact_url: NUL or backslash in {shown}")
    key = artifact_url
    if _SCHEME.match(artifact_url) or artifact_url.startswith("//"):
        for root in root_urls:
            if artifact_url.startswith(root + "/"):
                key = artifact_url[len(root) + 1 :]
                break
        else:
            raise CorruptArtifact(f"artifact_url: a URL outside this store (scheme, bucket or prefix): {shown}")
    if key.startswith("/"):
        raise CorruptArtifact(f"artifact_url: must be relative to the store, not absolute: {shown}")
    if "?" in key or "#" in key:
        raise CorruptArtifact(f"artifact_url: no query or fragment allowed: {shown}")
    parts = key.split("/")
    if len(parts) != 2:
        raise CorruptArtifact(f"artifact_url: must be <model folder>/<file>, got {len(parts)} parts: {shown}")
    if not all(_SEGMENT.fullmatch(p) for p in parts):
        raise CorruptArtifact(f"artifact_url: characters outside [A-Za-z0-9._~%-] in {shown}")
    try:
        _check_parts("artifact_url", key, shown)
    except UnicodeDecodeError:
        raise CorruptArtifact(f"artifact_url: percent-encoding that is not UTF-8 in {shown}") from None
    return key


# --- where the bytes live ---------------------------------------------------------------
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


class _LocalFiles:
    """Keys as files under a local directory; atomic writes by rename."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def location(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise CorruptArtifact(f"artifact_url: leads outside the store (a symlink?): {_shown(key)}")
        return path

    def read(self, key: str) -> bytes:
        return self.location(key).read_bytes()

    def write(self, key: str, data: bytes) -> None:
        path = self.location(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(path, data)

    def exists(self, key: str) -> bool:
        return self.location(key).is_file()

    def names(self, folder: str) -> list[str]:
        path = self.location(folder)
        return [p.name for p in path.iterdir() if p.is_file()] if path.is_dir() else []

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.location(key).unlink()


class _ObjectFiles:
    """Keys as objects of an fsspec filesystem under `root` (a path in that filesystem).

    Listings are never served from fsspec's cache: another process publishes."""

    def __init__(self, fs: Any, root: str, url: str) -> None:
        self.fs = fs
        self.root = root
        self.url = url

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def location(self, key: str) -> str:
        return f"{self.url}/{key}"

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self._path(key))

    def write(self, key: str, data: bytes) -> None:
        self.fs.pipe_file(self._path(key), data)  # one PUT (or multipart upload): all or nothing

    def exists(self, key: str) -> bool:
        path = self._path(key)
        self.fs.invalidate_cache(path)
        return bool(self.fs.isfile(path))

    def names(self, folder: str) -> list[str]:
        path = self._path(folder)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file"]

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))


def default_storage_options(protocol: str) -> dict[str, Any]:
    """fsspec options for `protocol` from the RLFEED_CHECKPOINT_S3_* settings (s3 only)."""
    if protocol not in S3_PROTOCOLS:
        return {}
    from services.config import RlfeedSettings

    return RlfeedSettings().checkpoint_storage_options()


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
    """Published versions of models' weights under a local directory or an fsspec URL.

    `root`: a path, `file://...`, `s3://bucket/prefix`, `memory://name`, ...
    `storage_options`: fsspec options of a URL root (s3: key, secret, client_kwargs
    with endpoint_url and region_name); unset: from the RLFEED_CHECKPOINT_S3_* settings.
    `root` is then a Path for a local store and the URL (a str) otherwise; `url` is
    always a URL."""

    def __init__(self, root: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> None:
        protocol, path = parse_location(root)
        self.protocol = protocol
        self.root: Path | str
        if protocol == "file":
            self.root = Path(path)
            self.url = self.root.as_uri()
            self._files: _LocalFiles | _ObjectFiles = _LocalFiles(self.root)
            self._root_urls: tuple[str, ...] = (self.url, f"file://{path}")
        else:
            import fsspec

            options = dict(default_storage_options(protocol) if storage_options is None else storage_options)
            fs = fsspec.filesystem(protocol, **options)
            fs_root = fs._strip_protocol(f"{protocol}://{path}").rstrip("/")
            self.url = f"{protocol}://{path}"
            self.root = self.url
            self._files = _ObjectFiles(fs, fs_root, self.url)
            self._root_urls = tuple(dict.fromkeys((self.url, fs.unstrip_protocol(fs_root).rstrip("/"))))

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"

    # --- keys ---
    def _manifest_key(self, model: str, version: int) -> str:
        if version < 0:
            raise ValueError(f"version: must be >= 0, got {version}")
        return f"{model_folder(model)}/{version:0{VERSION_DIGITS}d}.json"

    def resolve(self, artifact_url: str) -> Path | str:
        """Where an artifact_url points inside the store: a Path on a local store, a URL
        otherwise. CorruptArtifact naming artifact_url for anything outside the root
        (see `artifact_key`, and symlinks that lead out on a local store)."""
        return self._files.location(artifact_key(artifact_url, self._root_urls))

    def check_event(self, event: ModelUpdateEvent) -> str:
        """The key a model-updates.v1 event's artifact lies at in this store, or
        CorruptArtifact naming the field (`model`, `artifact_url`) that could reach outside
        it: for callers that refuse (and dead-letter) a hostile event before acting on it.
        `materialize` reads manifests from the store, never an event's artifact_url, and
        applies the same rules to them."""
        model_folder(event.model)
        return artifact_key(event.artifact_url, self._root_urls)

    # --- reading ---
    def has_version(self, model: str, version: int) -> bool:
        """Whether `version` of `model` is completely published (its manifest exists)."""
        return self._files.exists(self._manifest_key(model, version))

    def versions(self, model: str) -> list[int]:
        """Every published version of `model`, ascending."""
        names = self._files.names(model_folder(model))
        return sorted(int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit())

    def latest_version(self, model: str) -> int | None:
        """The highest published version of `model`, or None."""
        versions = self.versions(model)
        return versions[-1] if versions else None

    def manifest(self, model: str, version: int) -> ModelUpdateEvent:
        """The ModelUpdateEvent recorded for a published version."""
        key = self._manifest_key(model, version)
        try:
            return decode(ModelUpdateEvent, self._files.read(key))
        except FileNotFoundError:
            raise CorruptArtifact(f"{model} version {version} is not in the store") from None
        except InvalidEvent as exc:
            raise CorruptArtifact(f"{model} version {version}: bad manifest: {exc}") from None

    def _read_artifact(self, event: ModelUpdateEvent) -> bytes:
        key = artifact_key(event.artifact_url, self._root_urls)
        try:
            data = self._files.read(key)
        except OSError as exc:
            raise CorruptArtifact(f"{event.model} v{event.version}: cannot read {event.artifact_url}: {exc}") from None
        if hashlib.sha256(data).hexdigest() != event.sha256:
            raise CorruptArtifact(f"{event.model} v{event.version}: sha256 of {event.artifact_url} does not match")
        return data

    def materialize(
        self,
        model: str,
        version: int,
        have: tuple[int, dict[str, torch.Tensor]] | None = None,
        *,
        have_sha256: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Bit-exact weights of `version`, verified; raises CorruptArtifact.

        `have` is (version, weights) the caller already holds: when that version lies on
        the delta chain of `version`, the walk stops there instead of at a full snapshot
        (the weights are checked against that version's manifest before use).
        `have_sha256`: the checksum of `have`'s weights when the caller knows it (e.g. the
        manifest checksum of the version it materialized them as, which this method
        verified), to spare hashing them again. It is trusted only as far as the result:
        when the first delta fails on them and they do not hash to that checksum after
        all, the walk starts over from the store as if `have` had not been given.

        Every artifact's bytes are checked against their manifest's sha256, every
        reconstructed version against its manifest's weights checksum, and a delta's own
        base and result checksums against its base's and its own manifest."""
        chain: list[ModelUpdateEvent] = []
        current = version
        start: dict[str, torch.Tensor] | None = None
        start_sha: str | None = None
        seen: set[int] = set()
        while True:
            if current in seen:
                raise CorruptArtifact(f"{model}: delta chain loops at version {current}")
            seen.add(current)
            event = self.manifest(model, current)
            if event.version != current or event.model != model:
                raise CorruptArtifact(f"{model} v{current}: manifest names {event.model} v{event.version}")
            if have is not None and have[0] == current and event.weights_sha256 is not None:
                have_sha = have_sha256 if have_sha256 is not None else deltacodec.weights_sha256(have[1])
                if have_sha == event.weights_sha256:
                    start, start_sha = dict(have[1]), event.weights_sha256
                    break
            chain.append(event)
            if event.artifact_kind == ArtifactKind.FULL:
                break
            if event.base_version is None:
                raise CorruptArtifact(f"{model} v{current}: delta without base_version")
            current = event.base_version
        weights, weights_sha = start, start_sha
        for event in reversed(chain):
            data = self._read_artifact(event)
            if event.artifact_kind == ArtifactKind.FULL:
                try:
                    weights = st_load(data)
                except Exception as exc:
                    raise CorruptArtifact(f"{model} v{event.version}: undecodable safetensors: {exc}") from None
                if event.weights_sha256 is not None and deltacodec.weights_sha256(weights) != event.weights_sha256:
                    raise CorruptArtifact(f"{model} v{event.version}: reconstructed weights fail their checksum")
            else:
                assert weights is not None
                try:
                    weights = self._apply_delta(event, data, weights, weights_sha)
                except CorruptArtifact:
                    # Weights taken on the caller's word that fail now: if they are not
                    # what the caller said, start over from the store; else the delta is bad.
                    if start is None or have_sha256 is None or weights is not start:
                        raise
                    assert have is not None
                    if deltacodec.weights_sha256(have[1]) == start_sha:
                        raise
                    return self.materialize(model, version)
            weights_sha = event.weights_sha256
        assert weights is not None
        return weights

    @staticmethod
    def _apply_delta(
        event: ModelUpdateEvent,
        data: bytes,
        base: dict[str, torch.Tensor],
        base_sha: str | None,
    ) -> dict[str, torch.Tensor]:
        """`data` (the delta artifact of `event`) applied to `base`, whose checksum is
        `base_sha` when known. The delta's header must name that base checksum and the
        manifest's weights checksum; `delta.apply` then checks the result against it
        (hashing each tensor as soon as it is decoded)."""
        where = f"{event.model} v{event.version}"
        try:
            header = deltacodec.read_header(data)
        except deltacodec.DeltaError as exc:
            raise CorruptArtifact(f"{where}: {exc}") from None
        if base_sha is not None and header.get("base_sha256") != base_sha:
            raise CorruptArtifact(f"{where}: the delta was made against other weights than its base version")
        if event.weights_sha256 is not None and header.get("new_sha256") != event.weights_sha256:
            raise CorruptArtifact(f"{where}: reconstructed weights fail their checksum (the delta names another)")
        try:
            return deltacodec.apply(base, data, verify_base=False, verify_result=True)
        except deltacodec.DeltaError as exc:
            raise CorruptArtifact(f"{where}: {exc}") from None

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
        folder = model_folder(model)
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
        self._files.write(f"{folder}/{name}", data)
        event = ModelUpdateEvent(
            model=model,
            version=version,
            parent_version=parent_version,
            artifact_kind=kind,
            artifact_url=f"{folder}/{name}",
            base_version=base,
            sha256=hashlib.sha256(data).hexdigest(),
            weights_sha256=weights_sha,
            size_bytes=len(data),
            eval_metrics=eval_metrics or {},
        )
        # The other kind of artifact for this version, left by an earlier crashed attempt.
        self._files.delete(f"{folder}/{stem}.delta" if full else f"{folder}/{stem}.safetensors")
        self._files.write(self._manifest_key(model, version), encode(event))
        return event
