"""Lossless weight deltas: only the elements that changed, compressed, self-verifying.

`encode(old, new)` compares the raw bits of each tensor (so NaN payloads, -0.0 and
denormals survive) and writes, per tensor, the cheapest of:

| mode | payload |
|---|---|
| same | nothing: every bit equal |
| sparse | gap-encoded indices of the changed elements + XOR of their bits |
| bitmap | in base-exponent order: a bit per element (changed?) + zigzag differences of the changed |
| xor | XOR of every element's bits (zero where unchanged) |
| raw | the new tensor's bits (new name, or dtype/shape changed) |
| rice | like bitmap, but which elements changed is Rice-coded per exponent class |
| ricesm | like rice, but the differences as sign bits + one-byte magnitudes |

`bitmap` (format 2) is what large tensors get: a small optimiser step moves an element
by a few units in the last place, so `new - old` of the bits, read as an integer (mod
2**bits, zigzag-mapped so -1 -> 1, +1 -> 2), is a tiny number where the XOR is a carry
chain; and whether an element moved at all depends mostly on its magnitude (the ulp
against the step), so the elements are visited grouped by the exponent of their *old*
value (a stable sort the decoder repeats from the base): the bitmap becomes long runs of
0 (large weights, unchanged) and of 1 (small weights, all moved) that compress to almost
nothing. Encoding picks the smaller of `bitmap` and `sparse` per tensor (`xor` when
neither applies: a small tensor with many changes).

`rice` (format 3) codes the same change map closer to its entropy. Within one exponent
class of the base every element changes with about the same probability p (its ulp is
the same against about the same step), so the map is a run of coin flips: per class the
payload stores the number of changed elements and codes the gaps between the minority
symbol (the changed elements when p <= 1/2, else the unchanged ones) with a Golomb-Rice
code whose parameter fits that class's mean gap; a class that changed entirely or not at
all costs nothing. Unary parts and remainders go in two separate bit streams, so both
directions are vectorised. Rice codes of a geometric gap distribution come within a few
percent of the binary entropy h(p) per element, where zstd over the packed bitmap pays
for whole bytes. The differences of the changed elements follow as in `bitmap`.

`ricesm` (format 4) keeps `rice`'s change map and codes the differences as sign and
magnitude: the packed sign bits, then one byte per element, min(|d| - 1, 255), then the
full |d| - 1 of the few whose byte is 255. A bf16 publish of a small step moves most
changed elements by +-1 ulp, so the sign is a fair coin that costs exactly one bit here,
while inside a zigzag byte zstd's byte-wise Huffman code could not spend less than a
bit on the *byte* holding it besides; the magnitudes are mostly 0, in runs per exponent
class, which zstd codes well below a bit each. On SmolLM2-135M (bench/delta.py, bf16,
one step at the trainer's lr) it shrinks the differences by about a third, below the
order-0 entropy of the zigzag values per class. Which of the options is smallest is
still decided per tensor, so fp32 deltas (larger moves) keep `rice` where it wins.

Payload bytes are byte-plane shuffled (all first bytes, then all second bytes, ...),
because the XOR of two close floats is zero in its high bytes, and then compressed with
zstd when it is installed (`compression.zstd`, `backports.zstd` or `zstandard`), zlib
otherwise. The header records the codec, the weights checksum of the base and of the
result; `apply` checks both, so a delta applied to the wrong base, or a corrupted delta,
raises `DeltaError` instead of producing wrong weights.

File layout: `MAGIC`, a little-endian u32 header length, the JSON header, the payloads.
Format 1 (`RLFDELTA1`) has no `bitmap` mode, format 2 (`RLFDELTA2`) no `rice` mode,
format 3 (`RLFDELTA3`) no `ricesm` mode; this module writes format 4 (`RLFDELTA4`) and
reads all four.
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

MAGIC = b"RLFDELTA4\n"
"""The magic this module writes (format 4)."""
MAGIC_V3 = b"RLFDELTA3\n"
"""Format 3: same layout, no `ricesm` mode; still read."""
MAGIC_V2 = b"RLFDELTA2\n"
"""Format 2: same layout, no `rice` mode; still read."""
MAGIC_V1 = b"RLFDELTA1\n"
"""Format 1: same layout, no `bitmap` mode; still read."""
_FORMATS = {MAGIC_V1: 1, MAGIC_V2: 2, MAGIC_V3: 3, MAGIC: 4}
_MODES_SINCE = {"bitmap": 2, "rice": 3, "ricesm": 4}
SPARSE_MAX_FRACTION = 0.125
"""A tensor may go sparse when at most this fraction of its elements changed."""
BITMAP_MIN_NUMEL = 4096
"""Tensors with fewer elements never use `bitmap` (the header dominates there anyway)."""
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


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
    if t.numel() == 0:  # an empty tensor may have stride 0, which `view` refuses
        return np.empty(0, dtype=np.uint8)
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


def _order(base: np.ndarray, dtype: torch.dtype) -> np.ndarray | None:
    """The visiting order of `bitmap` mode: floats stably sorted by the exponent of the
    base value (sign excluded); None (natural order) for other dtypes."""
    mbits = _MANTISSA_BITS.get(dtype)
    if mbits is None:
        return None
    nbits = 8 * base.dtype.itemsize
    key = (base >> base.dtype.type(mbits)) & base.dtype.type((1 << (nbits - 1 - mbits)) - 1)
    key = key.astype(np.uint8 if nbits - 1 - mbits <= 8 else np.uint16)
    return np.argsort(key, kind="stable")


def _bitmap_payload(base: np.ndarray, new: np.ndarray, dtype: torch.dtype) -> tuple[bytes, int]:
    """`bitmap` payload (packed changed-bits, then shuffled zigzag differences) and count.
    `base`/`new` are flat arrays of the element-sized unsigned type."""
    nbits = 8 * base.dtype.itemsize
    order = _order(base, dtype)
    if order is not None:
        base, new = base[order], new[order]
    changed = base != new
    d = (new[changed] - base[changed]).view(f"i{base.dtype.itemsize}")
    zz = ((d << np.int8(1).astype(d.dtype)) ^ (d >> np.int8(nbits - 1).astype(d.dtype))).view(base.dtype)
    payload = np.packbits(changed).tobytes() + _shuffle(zz.view(np.uint8), base.dtype.itemsize)
    return payload, int(changed.sum())


def _apply_bitmap(base: np.ndarray, payload: bytes, count: int, dtype: torch.dtype, name: str) -> np.ndarray:
    """The new elements (flat, element-sized unsigned type) from a `bitmap` payload."""
    numel, itemsize = base.size, base.dtype.itemsize
    nmask = (numel + 7) // 8
    if len(payload) != nmask + count * itemsize:
        raise DeltaError(f"{name}: bitmap payload has the wrong size")
    changed = np.unpackbits(np.frombuffer(payload[:nmask], np.uint8), count=numel).astype(bool)
    if int(changed.sum()) != count:
        raise DeltaError(f"{name}: bitmap does not match the changed count")
    zz = _unshuffle(payload[nmask:], itemsize).view(base.dtype)
    one = base.dtype.type(1)
    d = (zz >> one) ^ (np.zeros_like(zz) - (zz & one))
    order = _order(base, dtype)
    ordered = base[order] if order is not None else base.copy()
    ordered[changed] += d
    if order is None:
        return ordered
    out = np.empty_like(base)
    out[order] = ordered
    return out


def _classes(base_sorted: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """[start, end) bounds of the exponent classes of a base already in `_order`: the
    class boundaries, from 0 to numel (only classes that hold elements)."""
    mbits = _MANTISSA_BITS[dtype]
    nbits = 8 * base_sorted.dtype.itemsize
    key = (base_sorted >> base_sorted.dtype.type(mbits)) & base_sorted.dtype.type((1 << (nbits - 1 - mbits)) - 1)
    cuts = np.flatnonzero(key[1:] != key[:-1]) + 1
    return np.concatenate([[0], cuts, [key.size]]).astype(np.int64)


def _rice_param(gaps: np.ndarray) -> int:
    """The Rice parameter r (0..40) that codes `gaps` in the fewest bits."""
    mean = float(gaps.mean()) if gaps.size else 0.0
    guess = max(0, int(np.log2(mean + 1.0)))
    best, best_bits = 0, None
    for r in range(max(0, guess - 2), min(40, guess + 2) + 1):
        bits = int((gaps >> np.uint64(r)).sum()) + gaps.size * (1 + r)
        if best_bits is None or bits < best_bits:
            best, best_bits = r, bits
    return best


def _rice_positions(base: np.ndarray, changed: np.ndarray, dtype: torch.dtype) -> bytes:
    """The change map of `rice` mode (`base` and `changed` in `_order`): per class a u32
    changed count (little-endian), per class a u8 Rice parameter, a u64 unary bit count,
    the packed unary stream (per gap: q zeros then a one), the packed remainder stream (r
    bits per gap, most significant first)."""
    bounds = _classes(base, dtype)
    counts = np.empty(len(bounds) - 1, dtype=np.uint32)
    params = np.zeros(len(bounds) - 1, dtype=np.uint8)
    unary: list[np.ndarray] = []
    rems: list[np.ndarray] = []
    for c in range(len(bounds) - 1):
        seg = changed[bounds[c] : bounds[c + 1]]
        k = int(seg.sum())
        counts[c] = k
        if k == 0 or k == seg.size:
            continue
        pos = np.flatnonzero(seg if 2 * k <= seg.size else ~seg)
        gaps = (np.diff(pos, prepend=-1) - 1).astype(np.uint64)
        r = _rice_param(gaps)
        params[c] = r
        q = (gaps >> np.uint64(r)).astype(np.int64)
        bits = np.zeros(int(q.sum()) + q.size, dtype=bool)
        bits[np.cumsum(q + 1) - 1] = True
        unary.append(bits)
        if r:
            shifts = np.arange(r - 1, -1, -1, dtype=np.uint64)
            rems.append(((gaps[:, None] >> shifts) & np.uint64(1)).astype(bool).reshape(-1))
    u = np.concatenate(unary) if unary else np.zeros(0, dtype=bool)
    rb = np.concatenate(rems) if rems else np.zeros(0, dtype=bool)
    return b"".join(
        [
            counts.astype("<u4").tobytes(),
            params.tobytes(),
            struct.pack("<Q", u.size),
            np.packbits(u).tobytes(),
            np.packbits(rb).tobytes(),
        ]
    )


def _zigzag_values(base: np.ndarray, new: np.ndarray) -> bytes:
    """The changed elements' `new - old` (mod 2**bits), zigzag-mapped, byte-shuffled."""
    nbits = 8 * base.dtype.itemsize
    d = (new - base).view(f"i{base.dtype.itemsize}")
    zz = ((d << np.int8(1).astype(d.dtype)) ^ (d >> np.int8(nbits - 1).astype(d.dtype))).view(base.dtype)
    return _shuffle(zz.view(np.uint8), base.dtype.itemsize)


def _signmag_values(base: np.ndarray, new: np.ndarray) -> bytes:
    """The changed elements' `new - old` (mod 2**bits, never 0) as sign and magnitude:
    the packed sign bits (1: negative), then per element one byte min(|d| - 1, 255), then
    the full |d| - 1 (byte-shuffled, element-sized) of the elements whose byte is 255.

    A small step moves most changed elements by +-1 ulp: the sign is a fair coin (one bit,
    which zstd's byte-wise Huffman cannot code below a bit per *byte* when it is mixed
    into the zigzag byte), and the magnitudes are mostly 0, in runs per exponent class."""
    d = new - base  # wraps: unsigned arithmetic mod 2**bits
    neg = d.view(f"i{base.dtype.itemsize}") < 0
    mag = np.where(neg, np.zeros_like(d) - d, d) - base.dtype.type(1)
    small = np.minimum(mag, base.dtype.type(255)).astype(np.uint8)
    big = mag[small == 255]
    return np.packbits(neg).tobytes() + small.tobytes() + _shuffle(big.view(np.uint8), base.dtype.itemsize)


def _rice_payload(base: np.ndarray, new: np.ndarray, dtype: torch.dtype, values: str = "zigzag") -> tuple[bytes, int]:
    """`rice` (values `zigzag`: as `bitmap` mode) or `ricesm` (values `signmag`) payload,
    and the changed count: `_rice_positions`, then the changed elements' differences."""
    order = _order(base, dtype)
    assert order is not None
    base, new = base[order], new[order]
    changed = base != new
    code = _signmag_values if values == "signmag" else _zigzag_values
    return _rice_positions(base, changed, dtype) + code(base[changed], new[changed]), int(changed.sum())


def _ordered_payloads(base: np.ndarray, new: np.ndarray, dtype: torch.dtype) -> tuple[dict[str, bytes], int]:
    """The `bitmap` payload, and for floats the `rice` and `ricesm` ones, of one tensor,
    sharing the visiting order, the change map and the differences (what
    `_bitmap_payload` and `_rice_payload` return, computed once); the changed count."""
    order = _order(base, dtype)
    if order is not None:
        base, new = base[order], new[order]
    changed = base != new
    b, n = base[changed], new[changed]
    zz = _zigzag_values(b, n)
    out = {"bitmap": np.packbits(changed).tobytes() + zz}
    if dtype in _MANTISSA_BITS:
        positions = _rice_positions(base, changed, dtype)
        out["rice"] = positions + zz
        out["ricesm"] = positions + _signmag_values(b, n)
    return out, int(b.size)


def _read_rice_positions(
    ordered: np.ndarray, payload: bytes, count: int, dtype: torch.dtype, name: str
) -> tuple[np.ndarray, int]:
    """The change map (in `_order`) of a `rice`/`ricesm` payload, and where its values
    start in `payload`."""
    bounds = _classes(ordered, dtype)
    n_cls = len(bounds) - 1
    sizes = np.diff(bounds)
    at = 5 * n_cls + 8
    if len(payload) < at:
        raise DeltaError(f"{name}: rice payload too short")
    counts = np.frombuffer(payload[: 4 * n_cls], dtype="<u4").astype(np.int64)
    params = np.frombuffer(payload[4 * n_cls : 5 * n_cls], dtype=np.uint8).astype(np.int64)
    (n_unary,) = struct.unpack_from("<Q", payload, 5 * n_cls)
    if (counts > sizes).any() or int(counts.sum()) != count or (params > 40).any():
        raise DeltaError(f"{name}: rice class counts do not fit the base")
    coded = (counts > 0) & (counts < sizes)
    minority = np.where(2 * counts <= sizes, counts, sizes - counts) * coded
    n_rem = int((minority * params).sum())
    u_bytes, r_bytes = (n_unary + 7) // 8, (n_rem + 7) // 8
    if len(payload) < at + u_bytes + r_bytes:
        raise DeltaError(f"{name}: rice payload too short")
    u = np.unpackbits(np.frombuffer(payload[at : at + u_bytes], np.uint8), count=n_unary)
    rb = np.unpackbits(np.frombuffer(payload[at + u_bytes : at + u_bytes + r_bytes], np.uint8), count=n_rem)
    ends = np.flatnonzero(u)
    if ends.size != int(minority.sum()):
        raise DeltaError(f"{name}: rice unary stream does not match the class counts")
    q_all = np.diff(ends, prepend=-1) - 1
    changed = np.zeros(ordered.size, dtype=bool)
    qi = ri = 0
    for c in np.flatnonzero(counts):
        lo, hi = int(bounds[c]), int(bounds[c + 1])
        if not coded[c]:
            changed[lo:hi] = True
            continue
        m, r = int(minority[c]), int(params[c])
        q = q_all[qi : qi + m].astype(np.int64)
        qi += m
        rem = np.zeros(m, dtype=np.int64)
        if r:
            bits = rb[ri : ri + m * r].reshape(m, r).astype(np.int64)
            ri += m * r
            rem = bits @ (1 << np.arange(r - 1, -1, -1, dtype=np.int64))
        pos = np.cumsum((q << r) + rem + 1) - 1
        if pos.size and pos[-1] >= hi - lo:
            raise DeltaError(f"{name}: rice positions run past their class")
        seg = np.zeros(hi - lo, dtype=bool)
        seg[pos] = True
        changed[lo:hi] = seg if 2 * counts[c] <= sizes[c] else ~seg
    return changed, at + u_bytes + r_bytes


def _read_zigzag(data: bytes, count: int, u: type, name: str) -> np.ndarray:
    """The differences `_zigzag_values` wrote (element-sized unsigned, mod 2**bits)."""
    itemsize = np.dtype(u).itemsize
    if len(data) != count * itemsize:
        raise DeltaError(f"{name}: rice payload has the wrong size")
    zz = _unshuffle(data, itemsize).view(u)
    one = u(1)
    return (zz >> one) ^ (np.zeros_like(zz) - (zz & one))


def _read_signmag(data: bytes, count: int, u: type, name: str) -> np.ndarray:
    """The differences `_signmag_values` wrote (element-sized unsigned, mod 2**bits)."""
    itemsize = np.dtype(u).itemsize
    n_sign = (count + 7) // 8
    if len(data) < n_sign + count:
        raise DeltaError(f"{name}: ricesm payload too short")
    neg = np.unpackbits(np.frombuffer(data[:n_sign], np.uint8), count=count).astype(bool)
    small = np.frombuffer(data[n_sign : n_sign + count], np.uint8)
    esc = small == 255
    if len(data) != n_sign + count + int(esc.sum()) * itemsize:
        raise DeltaError(f"{name}: ricesm payload has the wrong size")
    mag = small.astype(u)
    mag[esc] = _unshuffle(data[n_sign + count :], itemsize).view(u)
    d = mag + u(1)
    return np.where(neg, np.zeros_like(d) - d, d)


def _apply_rice(
    base: np.ndarray, payload: bytes, count: int, dtype: torch.dtype, name: str, values: str = "zigzag"
) -> np.ndarray:
    """The new elements (flat, element-sized unsigned type) from a `rice` (values
    `zigzag`) or `ricesm` (values `signmag`) payload."""
    order = _order(base, dtype)
    assert order is not None
    ordered = base[order]
    changed, at = _read_rice_positions(ordered, payload, count, dtype, name)
    read = _read_signmag if values == "signmag" else _read_zigzag
    ordered[changed] += read(payload[at:], count, base.dtype.type, name)
    out = np.empty_like(base)
    out[order] = ordered
    return out


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
        data: bytes | None = None
        if base is None or base.dtype != t.dtype or tuple(base.shape) != tuple(t.shape):
            entry["mode"], payload = "raw", _shuffle(new_raw, itemsize)
        else:
            xor = np.bitwise_xor(_raw(base), new_raw)
            changed = np.flatnonzero(xor.reshape(-1, itemsize).any(axis=1)) if xor.size else np.empty(0, np.int64)
            numel = t.numel()
            if changed.size == 0:
                entry["mode"], payload = "same", b""
            else:
                options: list[tuple[bytes, bytes, dict[str, object]]] = []
                if changed.size <= SPARSE_MAX_FRACTION * numel:
                    gaps = np.diff(changed, prepend=-1).astype(np.uint64)
                    values = xor.reshape(-1, itemsize)[changed].reshape(-1)
                    p = _shuffle(gaps.view(np.uint8), 8) + _shuffle(values, itemsize)
                    options.append((_compress(codec, p), p, {"mode": "sparse", "count": int(changed.size)}))
                if numel >= BITMAP_MIN_NUMEL and itemsize in _UINT:
                    u = _UINT[itemsize]
                    payloads, count = _ordered_payloads(_raw(base).view(u), new_raw.view(u), t.dtype)
                    for mode, p in payloads.items():
                        options.append((_compress(codec, p), p, {"mode": mode, "count": count}))
                if not options:
                    p = _shuffle(xor, itemsize)
                    options.append((_compress(codec, p), p, {"mode": "xor"}))
                data, payload, fields = min(options, key=lambda o: len(o[0]))
                entry.update(fields)
        entry["raw_length"] = len(payload)
        if data is None:
            data = _compress(codec, payload) if payload else b""
        entry["offset"], entry["length"] = offset, len(data)
        offset += len(data)
        chunks.append(data)
        entries.append(entry)
    header = {
        "format": 4,
        "codec": codec,
        "base_sha256": old_sha256 or weights_sha256(old),
        "new_sha256": new_sha256 or weights_sha256(new),
        "tensors": entries,
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(head)), head, *chunks])


def read_header(delta: bytes) -> dict:
    """The JSON header of a delta (raises `DeltaError` when it is not one)."""
    if not any(delta.startswith(m) for m in _FORMATS) or len(delta) < len(MAGIC) + 4:
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
    fmt = _FORMATS[delta[: len(MAGIC)]]
    if header.get("format", 1) != fmt:
        raise DeltaError(f"delta format {header.get('format')!r} does not match its magic")
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
            elif mode == "bitmap" and itemsize in _UINT and fmt >= _MODES_SINCE["bitmap"]:
                u = _UINT[itemsize]
                new_flat = _apply_bitmap(base_raw.view(u), payload, int(e["count"]), dtype, e["name"])
                out[e["name"]] = _tensor(new_flat.view(np.uint8), dtype, shape)
            elif (
                mode in ("rice", "ricesm")
                and itemsize in _UINT
                and dtype in _MANTISSA_BITS
                and fmt >= _MODES_SINCE[mode]
            ):
                u = _UINT[itemsize]
                values = "signmag" if mode == "ricesm" else "zigzag"
                new_flat = _apply_rice(base_raw.view(u), payload, int(e["count"]), dtype, e["name"], values)
                out[e["name"]] = _tensor(new_flat.view(np.uint8), dtype, shape)
            else:
                raise DeltaError(f"{e['name']}: unknown mode {mode!r}")
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, DeltaError):
            raise
        raise DeltaError(f"malformed delta: {exc!r}") from None
    if verify_result and weights_sha256(out) != header.get("new_sha256"):
        raise DeltaError("reconstructed weights do not match the delta's checksum")
    return out
