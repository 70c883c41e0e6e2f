"""Lossless weight deltas: only the elements that changed, compressed, self-verifying.

`encode(old, new)` compares the raw bits of each tensor (so NaN payloads, -0.0 and
denormals survive) and writes, per tensor, the cheapest of:

| mode | payload |
|---|---|
| same | nothing: every bit equal |
| sparse | gap-encoded indices of the changed elements + XOR of their bits |
| xor | XOR of every element's bits (zero where unchanged) |
| raw | the new tensor's bits (new name, or dtype/shape changed) |

Payload bytes are byte-plane shuffled (all first bytes, then all second bytes, ...),
because the XOR of two close floats is zero in its high bytes, and then compressed with
zstd when it is installed (`compression.zstd`, `backports.zstd` or `zstandard`), zlib
otherwise. The header records the codec, the weights checksum of the base and of the
result; `apply` checks both, so a delta applied to the wrong base, or a corrupted delta,
raises `DeltaError` instead of producing wrong weights.

File layout: `MAGIC`, a little-endian u32 header length, the JSON header, the payloads.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
import zlib
from collections.abc import Callable, Mapping

import numpy as np
import torch

MAGIC = b"RLFDELTA1\n"
SPARSE_MAX_FRACTION = 0.125
"""A tensor goes sparse when at most this fraction of its elements changed."""


class DeltaError(ValueError):
    """A delta that cannot be decoded, or does not fit the weights it is applied to."""


def _zstd() -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]] | None:
    for name in ("compression.zstd", "backports.zstd"):
        try:
            mod = __import__(name, fromlist=["compress"])
            return functools.partial(mod.compress, level=3), mod.decompress
        except ImportError:
            continue
    try:
        import zstandard

        return zstandard.ZstdCompressor(level=3).compress, zstandard.ZstdDecompressor().decompress
    except ImportError:
        return None


_ZSTD = _zstd()


def default_codec() -> str:
    """`zstd` when a zstd module is installed, else `zlib`."""
    return "zstd" if _ZSTD is not None else "zlib"


def _compress(codec: str, data: bytes) -> bytes:
    if codec == "zstd":
        if _ZSTD is None:
            raise DeltaError("zstd requested but no zstd module is installed")
        return _ZSTD[0](data)
    return zlib.compress(data, 6)


def _decompress(codec: str, data: bytes, expected: int) -> bytes:
    try:
        if codec == "zstd":
            if _ZSTD is None:
                raise DeltaError("delta is zstd-compressed but no zstd module is installed")
            out = _ZSTD[1](data)
        elif codec == "zlib":
            out = zlib.decompress(data)
        else:
            raise DeltaError(f"unknown codec {codec!r}")
    except DeltaError:
        raise
    except Exception as exc:  # each library raises its own error type
        raise DeltaError(f"payload does not decompress: {exc}") from None
    if len(out) != expected:
        raise DeltaError(f"payload decompressed to {len(out)} bytes, expected {expected}")
    return out


def _raw(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array (no copy when already contiguous on CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise DeltaError(f"unknown dtype {name!r}")
    return dtype


def _shuffle(flat: np.ndarray, itemsize: int) -> bytes:
    return flat.reshape(-1, itemsize).T.tobytes() if itemsize > 1 else flat.tobytes()


def _unshuffle(data: bytes, itemsize: int) -> np.ndarray:
    arr = np.frombuffer(data, dtype=np.uint8)
    return arr.reshape(itemsize, -1).T.reshape(-1) if itemsize > 1 else arr


def _tensor(flat: np.ndarray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
    if flat.size == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.ascontiguousarray(flat).copy()).view(dtype).reshape(shape)


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, with each tensor's dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        raw = _raw(t)
        h.update(struct.pack("<Q", raw.nbytes))
        h.update(memoryview(raw))
    return h.hexdigest()


def encode(
    old: Mapping[str, torch.Tensor],
    new: Mapping[str, torch.Tensor],
    *,
    codec: str | None = None,
    old_sha256: str | None = None,
    new_sha256: str | None = None,
) -> bytes:
    """The delta that turns `old` into `new`, bit for bit (names missing from `new` are
    dropped). Pass the checksums if they are known, to skip computing them again."""
    codec = codec or default_codec()
    entries: list[dict[str, object]] = []
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(new):
        t = new[name]
        itemsize = t.element_size()
        entry: dict[str, object] = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        base = old.get(name)
        new_raw = _raw(t)
        if base is None or base.dtype != t.dtype or tuple(base.shape) != tuple(t.shape):
            entry["mode"], payload = "raw", _shuffle(new_raw, itemsize)
        else:
            xor = np.bitwise_xor(_raw(base), new_raw)
            changed = np.flatnonzero(xor.reshape(-1, itemsize).any(axis=1)) if xor.size else np.empty(0, np.int64)
            numel = t.numel()
            if changed.size == 0:
                entry["mode"], payload = "same", b""
            elif changed.size <= SPARSE_MAX_FRACTION * numel:
                gaps = np.diff(changed, prepend=-1).astype(np.uint64)
                values = xor.reshape(-1, itemsize)[changed].reshape(-1)
                entry["mode"], entry["count"] = "sparse", int(changed.size)
                payload = _shuffle(gaps.view(np.uint8), 8) + _shuffle(values, itemsize)
            else:
                entry["mode"], payload = "xor", _shuffle(xor, itemsize)
        entry["raw_length"] = len(payload)
        data = _compress(codec, payload) if payload else b""
        entry["offset"], entry["length"] = offset, len(data)
        offset += len(data)
        chunks.append(data)
        entries.append(entry)
    header = {
        "codec": codec,
        "base_sha256": old_sha256 or weights_sha256(old),
        "new_sha256": new_sha256 or weights_sha256(new),
        "tensors": entries,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *chunks])


def read_header(delta: bytes) -> dict:
    """The JSON header of a delta (raises `DeltaError` when it is not one)."""
    if not delta.startswith(MAGIC) or len(delta) < len(MAGIC) + 4:
        raise DeltaError("not an rlfeed delta (bad magic)")
    (n,) = struct.unpack_from("<I", delta, len(MAGIC))
    start = len(MAGIC) + 4
    if start + n > len(delta):
        raise DeltaError("truncated delta header")
    try:
        header = json.loads(delta[start : start + n])
        header["_payload_start"] = start + n
        return header
    except (ValueError, TypeError) as exc:
        raise DeltaError(f"undecodable delta header: {exc}") from None


def apply(
    old: Mapping[str, torch.Tensor], delta: bytes, *, verify_base: bool = True, verify_result: bool = True
) -> dict[str, torch.Tensor]:
    """The weights `delta` encodes, given the `old` weights it was made against.

    Checks the base checksum first and the result's checksum last; raises `DeltaError`."""
    header = read_header(delta)
    if verify_base and weights_sha256(old) != header.get("base_sha256"):
        raise DeltaError("delta does not apply to these weights (base checksum differs)")
    start = header["_payload_start"]
    out: dict[str, torch.Tensor] = {}
    try:
        codec = header["codec"]
        for e in header["tensors"]:
            dtype, shape, mode = _dtype(e["dtype"]), [int(s) for s in e["shape"]], e["mode"]
            itemsize = torch.empty((), dtype=dtype).element_size()
            numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
            lo, hi = start + int(e["offset"]), start + int(e["offset"]) + int(e["length"])
            if hi > len(delta):
                raise DeltaError(f"{e['name']}: payload runs past the end of the delta")
            payload = _decompress(codec, delta[lo:hi], int(e["raw_length"])) if e["length"] else b""
            if mode == "raw":
                if len(payload) != numel * itemsize:
                    raise DeltaError(f"{e['name']}: raw payload has the wrong size")
                out[e["name"]] = _tensor(_unshuffle(payload, itemsize), dtype, shape)
                continue
            base = old.get(e["name"])
            if base is None or base.dtype != dtype or list(base.shape) != shape:
                raise DeltaError(f"{e['name']}: missing from the base or of another dtype/shape")
            base_raw = _raw(base)
            if mode == "same":
                out[e["name"]] = _tensor(base_raw, dtype, shape)
            elif mode == "xor":
                if len(payload) != numel * itemsize:
                    raise DeltaError(f"{e['name']}: xor payload has the wrong size")
                out[e["name"]] = _tensor(np.bitwise_xor(base_raw, _unshuffle(payload, itemsize)), dtype, shape)
            elif mode == "sparse":
                count = int(e["count"])
                if len(payload) != count * (8 + itemsize):
                    raise DeltaError(f"{e['name']}: sparse payload has the wrong size")
                gaps = _unshuffle(payload[: count * 8], 8).view(np.uint64).astype(np.int64)
                idx = np.cumsum(gaps) - 1
                if count and ((gaps <= 0).any() or idx[-1] >= numel):
                    raise DeltaError(f"{e['name']}: sparse indices out of range")
                values = _unshuffle(payload[count * 8 :], itemsize).reshape(-1, itemsize)
                flat = base_raw.reshape(-1, itemsize).copy()
                flat[idx] ^= values
                out[e["name"]] = _tensor(flat.reshape(-1), dtype, shape)
            else:
                raise DeltaError(f"{e['name']}: unknown mode {mode!r}")
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DeltaError):
            raise
        raise DeltaError(f"malformed delta: {exc!r}") from None
    if verify_result and weights_sha256(out) != header.get("new_sha256"):
        raise DeltaError("reconstructed weights do not match the delta's checksum")
    return out
