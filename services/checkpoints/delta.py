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

Decoding speed (the format does not depend on any of it): a serving replica applies a
delta to every version it loads, so `apply` avoids materialising the visiting order.
With numba installed, one pass over the base in natural order finds each element's
exponent class and takes that class's next change flag and difference (`_class_scatter`;
`_class_gather` is the encoder's mirror image, `_signmag_decode` reads `ricesm`
differences in one pass); without it the same result comes from a stable argsort and a
scatter of the differences only. `apply` decodes several tensors at once in threads
(zstd and the kernels release the GIL) and hashes each finished tensor for the result
checksum while later ones still decode; a caller that knows the base's checksum passes
it instead of having the base hashed again.

File layout: `MAGIC`, a little-endian u32 header length, the JSON header, the payloads.
Format 1 (`RLFDELTA1`) has no `bitmap` mode, format 2 (`RLFDELTA2`) no `rice` mode,
format 3 (`RLFDELTA3`) no `ricesm` mode; this module writes format 4 (`RLFDELTA4`) and
reads all four.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import struct
import threading
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

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
    """The inverse of `_shuffle`: a new, writable flat uint8 array. Written one byte plane
    at a time (a strided store per plane is a few times cheaper than numpy's copy of the
    transposed view)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    if itemsize == 1:
        return arr.copy()
    planes = arr.reshape(itemsize, -1)
    out = np.empty((planes.shape[1], itemsize), dtype=np.uint8)
    for j in range(itemsize):
        out[:, j] = planes[j]
    return out.reshape(-1)


def _tensor(flat: np.ndarray, dtype: torch.dtype, shape: list[int], *, copy: bool = True) -> torch.Tensor:
    """A tensor of `flat`'s bytes; `copy=False` hands over `flat` (a fresh, writable,
    contiguous array nobody else holds) instead of copying it."""
    if flat.size == 0:
        return torch.empty(shape, dtype=dtype)
    if copy or not flat.flags.writeable or not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat).copy()
    return torch.from_numpy(flat).view(dtype).reshape(shape)


def _class_key(base: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Per element of a float tensor's bits, its exponent class: the biased exponent of
    the value (sign excluded), as uint8 (uint16 for float64)."""
    mbits = _MANTISSA_BITS[dtype]
    nbits = 8 * base.dtype.itemsize
    ebits = nbits - 1 - mbits
    key = (base >> base.dtype.type(mbits)) & base.dtype.type((1 << ebits) - 1)
    return key.astype(np.uint8 if ebits <= 8 else np.uint16)


def _order(base: np.ndarray, dtype: torch.dtype) -> np.ndarray | None:
    """The visiting order of `bitmap` mode: floats stably sorted by the exponent of the
    base value (sign excluded); None (natural order) for other dtypes."""
    if dtype not in _MANTISSA_BITS:
        return None
    return np.argsort(_class_key(base, dtype), kind="stable")


def _key_counts(key: np.ndarray) -> np.ndarray:
    """np.bincount of `key` (uint8 or uint16). uint8 keys are counted two at a time, as
    uint16 pairs (np.bincount widens its input to int64 first, so half as many elements
    cost half as much), and the 256 x 256 pair counts folded back."""
    if key.dtype != np.uint8 or key.size < 2:
        return np.bincount(key)
    even = key.size - key.size % 2
    pairs = np.bincount(key[:even].view(np.uint16), minlength=1 << 16).reshape(256, 256)
    counts = pairs.sum(axis=0) + pairs.sum(axis=1)
    if key.size % 2:
        counts[key[-1]] += 1
    return counts


USE_NUMBA = True
"""Decode with the numba kernels below when numba is installed (tests switch it off to
cover the numpy path, which gives the same bytes). numba does not check bounds: every
caller validates the sizes first (the change map holds numel flags, as many set as there
are differences; the escapes of `ricesm` match its 255 bytes), so a hostile delta is
refused before a kernel sees it."""
_KERNELS: tuple[Callable[..., Any], ...] | None = None
_KERNELS_LOCK = threading.Lock()
_KERNELS_TRIED = False


def _class_hist(base: np.ndarray, mbits: np.unsignedinteger, emask: np.unsignedinteger, nkeys: int) -> np.ndarray:
    """Per exponent class key, how many elements of `base` have it (one pass)."""
    counts = np.zeros(nkeys, np.int64)
    for i in range(base.size):
        counts[(base[i] >> mbits) & emask] += 1
    return counts


def _class_scatter(
    base: np.ndarray,
    mbits: np.unsignedinteger,
    emask: np.unsignedinteger,
    starts: np.ndarray,
    dstarts: np.ndarray,
    changed: np.ndarray,
    d: np.ndarray,
    out: np.ndarray,
) -> None:
    """`out[i] = base[i] + (the difference of element i, if it changed)`, walking `base`
    in natural order: element i of class c is the next position of class c in visiting
    order (`starts[c]` onwards), and, if `changed` there (`changed` empty: every element
    changed), takes the next difference of class c (`dstarts[c]` onwards in `d`). The
    same result as gathering by `_order`, adding and scattering back, without the order."""
    ptr = starts.copy()
    dp = dstarts.copy()
    every = changed.size == 0
    for i in range(base.size):
        b = base[i]
        c = (b >> mbits) & emask
        j = ptr[c]
        ptr[c] = j + 1
        if every:
            out[i] = b + d[j]
        elif changed[j]:
            out[i] = b + d[dp[c]]
            dp[c] += 1
        else:
            out[i] = b


def _class_gather(
    base: np.ndarray,
    mbits: np.unsignedinteger,
    emask: np.unsignedinteger,
    starts: np.ndarray,
    values: np.ndarray,
    out: np.ndarray,
) -> None:
    """`out = values[_order(base)]` in one pass over `base` in natural order, without the
    order: element i of class c goes to the next position of class c (`starts[c]` on)."""
    ptr = starts.copy()
    for i in range(base.size):
        c = (base[i] >> mbits) & emask
        out[ptr[c]] = values[i]
        ptr[c] += 1


def _signmag_decode(signs: np.ndarray, small: np.ndarray, big: np.ndarray, out: np.ndarray) -> int:
    """`_read_signmag`'s differences in one pass: `out` (signed, element-sized) gets
    +-(byte + 1), or +-(the next of `big` + 1) where the byte is 255, negative where the
    element's packed sign bit is set. Stores wrap (|d| = 2**(bits-1) included). Returns
    how many of `big` it used, or -1 when there were too few (the payload is bad)."""
    e = 0
    for p in range(small.size):
        s = small[p]
        if s == 255:
            if e >= big.size:
                return -1
            m = big[e] + 1
            e += 1
        else:
            m = s + 1
        if (signs[p >> 3] >> (7 - (p & 7))) & 1:
            out[p] = -m
        else:
            out[p] = m
    return e


def _kernels() -> tuple[Callable[..., Any], ...] | None:
    """The numba-compiled `_class_hist`, `_class_scatter`, `_class_gather` and
    `_signmag_decode` (None: numba not installed,
    or `USE_NUMBA` off). Compiled once per process (cached on disk when the package
    folder is writable), typed by the element size at first use."""
    global _KERNELS, _KERNELS_TRIED
    if not USE_NUMBA:
        return None
    with _KERNELS_LOCK:
        if not _KERNELS_TRIED:
            _KERNELS_TRIED = True
            try:
                import numba
            except ImportError:
                return None
            kernels = []
            for fn in (_class_hist, _class_scatter, _class_gather, _signmag_decode):
                try:
                    kernels.append(numba.njit(nogil=True, cache=True)(fn))
                except Exception:  # no writable cache location: compile per process
                    kernels.append(numba.njit(nogil=True)(fn))
            _KERNELS = tuple(kernels)
    return _KERNELS


def _class_counts(base: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """How many elements of a float tensor's bits fall in each exponent class key
    (all 2**exponent_bits keys, int64)."""
    mbits = _MANTISSA_BITS[dtype]
    nkeys = 1 << (8 * base.dtype.itemsize - 1 - mbits)
    kernels = _kernels()
    if kernels is not None and base.size:
        return kernels[0](base, base.dtype.type(mbits), base.dtype.type(nkeys - 1), nkeys)
    counts = _key_counts(_class_key(base, dtype))[:nkeys]  # keys < nkeys: the rest are zeros
    out = np.zeros(nkeys, np.int64)
    out[: counts.size] = counts
    return out


def _in_order(base: np.ndarray, dtype: torch.dtype, counts: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`values[_order(base, dtype)]` for a float tensor whose `_class_counts` are `counts`
    (one pass of the numba kernel when numba is there)."""
    kernels = _kernels()
    if kernels is None or base.size == 0:
        return values[_order(base, dtype)]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    out = np.empty_like(values)
    kernels[2](base, base.dtype.type(_MANTISSA_BITS[dtype]), base.dtype.type(counts.size - 1), starts, values, out)
    return out


def _bounds(counts: np.ndarray) -> np.ndarray:
    """[start, end) bounds in `_order` of the classes that hold elements (what `_classes`
    finds in the sorted base): the keys present, ascending, with their counts as sizes."""
    return np.concatenate([[0], np.cumsum(counts[counts > 0])]).astype(np.int64)


def _add_by_class(
    base: np.ndarray, dtype: torch.dtype, counts: np.ndarray, changed: np.ndarray | None, d: np.ndarray
) -> np.ndarray:
    """`base` (flat, element-sized unsigned) with `d` added (mod 2**bits) to the elements
    that `changed` (None: all) marks in `_order`, for a float tensor whose `_class_counts`
    are `counts`. One pass of the numba kernel when numba is there, else `_add_in_order`."""
    kernels = _kernels()
    if kernels is None or base.size == 0:
        return _add_in_order(base, _order(base, dtype), changed, d)
    mbits = _MANTISSA_BITS[dtype]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    if changed is None:
        dstarts, flags = starts, np.zeros(0, np.uint8)
    else:
        present = counts > 0
        dcounts = np.zeros_like(counts)
        bounds = _bounds(counts)
        # per class: a vectorised count over its slice (reduceat would widen the map to int64)
        dcounts[present] = [np.count_nonzero(changed[lo:hi]) for lo, hi in itertools.pairwise(bounds)]
        dstarts = np.concatenate([[0], np.cumsum(dcounts)[:-1]]).astype(np.int64)
        flags = changed.view(np.uint8)
    out = np.empty_like(base)
    kernels[1](base, base.dtype.type(mbits), base.dtype.type(counts.size - 1), starts, dstarts, flags, d, out)
    return out


def _add_in_order(base: np.ndarray, order: np.ndarray | None, changed: np.ndarray | None, d: np.ndarray) -> np.ndarray:
    """`base` (flat, element-sized unsigned) with `d` added (mod 2**bits) to the elements
    that `changed` (None: all of them) marks in visiting `order` (None: natural order).

    Works on the changed positions only: the base is never gathered into visiting order
    and scattered back. When most elements changed, the differences are scattered into a
    zero array and added in one pass; otherwise only the changed elements are touched."""
    if order is None:
        out = base.copy()
        if changed is None:
            out += d
        else:
            out[changed] += d
        return out
    if changed is None:  # every position gets written: no zeroing needed
        out = np.empty_like(base)
        out[order] = d
        out += base
        return out
    idx = order[changed]
    if 2 * idx.size >= base.size:
        dn = np.zeros(base.shape, dtype=base.dtype)
        dn[idx] = d
        dn += base
        return dn
    out = base.copy()
    out[idx] += d  # idx has no repeats: order is a permutation
    return out


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
    changed = np.unpackbits(np.frombuffer(payload[:nmask], np.uint8), count=numel).view(bool)
    if int(np.count_nonzero(changed)) != count:
        raise DeltaError(f"{name}: bitmap does not match the changed count")
    d = _read_zigzag(payload[nmask:], count, base.dtype.type, name)
    if dtype not in _MANTISSA_BITS:
        return _add_in_order(base, None, None if count == numel else changed, d)
    return _add_by_class(base, dtype, _class_counts(base, dtype), None if count == numel else changed, d)


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


def _rice_positions(
    base: np.ndarray | None, changed: np.ndarray, dtype: torch.dtype, bounds: np.ndarray | None = None
) -> bytes:
    """The change map of `rice` mode (`base` and `changed` in `_order`): per class a u32
    changed count (little-endian), per class a u8 Rice parameter, a u64 unary bit count,
    the packed unary stream (per gap: q zeros then a one), the packed remainder stream (r
    bits per gap, most significant first)."""
    if bounds is None:  # `_classes` of the sorted base, unless the caller has the bounds
        assert base is not None
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
    return _zigzag_of(new - base)


def _zigzag_of(d: np.ndarray) -> bytes:
    """`_zigzag_values` of the differences `d` (element-sized unsigned, mod 2**bits)."""
    nbits = 8 * d.dtype.itemsize
    s = d.view(f"i{d.dtype.itemsize}")
    zz = ((s << np.int8(1).astype(s.dtype)) ^ (s >> np.int8(nbits - 1).astype(s.dtype))).view(d.dtype)
    return _shuffle(zz.view(np.uint8), d.dtype.itemsize)


def _signmag_values(base: np.ndarray, new: np.ndarray) -> bytes:
    """The changed elements' `new - old` (mod 2**bits, never 0) as sign and magnitude:
    the packed sign bits (1: negative), then per element one byte min(|d| - 1, 255), then
    the full |d| - 1 (byte-shuffled, element-sized) of the elements whose byte is 255.

    A small step moves most changed elements by +-1 ulp: the sign is a fair coin (one bit,
    which zstd's byte-wise Huffman cannot code below a bit per *byte* when it is mixed
    into the zigzag byte), and the magnitudes are mostly 0, in runs per exponent class."""
    return _signmag_of(new - base)  # wraps: unsigned arithmetic mod 2**bits


def _signmag_of(d: np.ndarray) -> bytes:
    """`_signmag_values` of the differences `d` (element-sized unsigned, mod 2**bits)."""
    s = d.view(f"i{d.dtype.itemsize}")
    neg = s < 0
    mag = np.abs(s).view(d.dtype)  # |-2**(bits-1)| wraps to itself: as unsigned, the right magnitude
    mag -= d.dtype.type(1)
    small = np.minimum(mag, d.dtype.type(255)).astype(np.uint8)
    big = mag[small == 255]
    return np.packbits(neg).tobytes() + small.tobytes() + _shuffle(big.view(np.uint8), d.dtype.itemsize)


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
    `_bitmap_payload` and `_rice_payload` return, computed once); the changed count.
    Works on the differences alone: one gather into visiting order, and the class
    bounds from the key counts instead of the sorted base."""
    diff = new - base  # wraps: unsigned arithmetic mod 2**bits
    is_float = dtype in _MANTISSA_BITS
    if is_float:
        counts = _class_counts(base, dtype)
        diff = _in_order(base, dtype, counts, diff)
    changed = diff != 0
    d = diff[changed]
    out = {"bitmap": np.packbits(changed).tobytes() + _zigzag_of(d)}
    if is_float:
        positions = _rice_positions(None, changed, dtype, bounds=_bounds(counts))
        out["rice"] = positions + out["bitmap"][(changed.size + 7) // 8 :]
        out["ricesm"] = positions + _signmag_of(d)
    return out, int(d.size)


def _read_rice_positions(bounds: np.ndarray, payload: bytes, count: int, name: str) -> tuple[np.ndarray | None, int]:
    """The change map (in `_order`; None when every element changed) of a `rice`/`ricesm`
    payload over exponent classes with these `bounds`, and where its values start."""
    n_cls = len(bounds) - 1
    numel = int(bounds[-1])
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
    if count == numel:
        return None, at + u_bytes + r_bytes
    q_all = np.diff(ends, prepend=-1) - 1
    changed = np.zeros(numel, dtype=bool)
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
        seg = changed[lo:hi]
        if 2 * counts[c] <= sizes[c]:
            seg[pos] = True
        else:
            seg[:] = True
            seg[pos] = False
    return changed, at + u_bytes + r_bytes


def _read_zigzag(data: bytes, count: int, u: type, name: str) -> np.ndarray:
    """The differences `_zigzag_values` wrote (element-sized unsigned, mod 2**bits)."""
    itemsize = np.dtype(u).itemsize
    if len(data) != count * itemsize:
        raise DeltaError(f"{name}: rice payload has the wrong size")
    zz = _unshuffle(data, itemsize).view(u)
    sign = zz & u(1)
    np.negative(sign, out=sign)  # 0 or all ones
    zz >>= u(1)
    zz ^= sign
    return zz


def _read_signmag(data: bytes, count: int, u: type, name: str) -> np.ndarray:
    """The differences `_signmag_values` wrote (element-sized unsigned, mod 2**bits)."""
    itemsize = np.dtype(u).itemsize
    n_sign = (count + 7) // 8
    if len(data) < n_sign + count:
        raise DeltaError(f"{name}: ricesm payload too short")
    small = np.frombuffer(data[n_sign : n_sign + count], np.uint8)
    wrong_size = DeltaError(f"{name}: ricesm payload has the wrong size")
    if (len(data) - n_sign - count) % itemsize:
        raise wrong_size
    signed = np.dtype(f"i{itemsize}")
    kernels = _kernels()
    if kernels is not None:  # the kernel counts the escapes as it goes: no scan for them first
        big = _unshuffle(data[n_sign + count :], itemsize).view(signed)
        out = np.empty(count, dtype=signed)
        if kernels[3](np.frombuffer(data[:n_sign], np.uint8), small, big, out) != big.size:
            raise wrong_size
        return out.view(u)
    esc = np.flatnonzero(small == 255)
    if len(data) != n_sign + count + esc.size * itemsize:
        raise wrong_size
    d = small.astype(signed)
    if esc.size:
        d[esc] = _unshuffle(data[n_sign + count :], itemsize).view(signed)
    d += signed.type(1)  # wraps for |d| = 2**(bits-1), as the encoder's unsigned arithmetic did
    # -1 or +1 per element: one multiply is cheaper than a masked negation
    d *= 1 - 2 * np.unpackbits(np.frombuffer(data[:n_sign], np.uint8), count=count).view(np.int8)
    d = d.view(u)
    return d


def _apply_rice(
    base: np.ndarray, payload: bytes, count: int, dtype: torch.dtype, name: str, values: str = "zigzag"
) -> np.ndarray:
    """The new elements (flat, element-sized unsigned type) from a `rice` (values
    `zigzag`) or `ricesm` (values `signmag`) payload."""
    counts = _class_counts(base, dtype)
    changed, at = _read_rice_positions(_bounds(counts), payload, count, name)
    read = _read_signmag if values == "signmag" else _read_zigzag
    return _add_by_class(base, dtype, counts, changed, read(payload[at:], count, base.dtype.type, name))


def _hash_tensor(h: hashlib._Hash, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
    raw = _raw(t)
    h.update(struct.pack("<Q", raw.nbytes))
    h.update(memoryview(raw))


def same_bits(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same names, dtypes, shapes and bits (NaN payloads
    and -0.0 included, where `torch.equal` on values would not tell)."""
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8))
        for k in a
    )


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, with each tensor's dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        _hash_tensor(h, name, state_dict[name])
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
            if itemsize in _UINT:  # whole elements at once: far cheaper than any() over their bytes
                u = _UINT[itemsize]
                changed = np.flatnonzero(xor.view(u))
            else:
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


def _decode_entry(
    e: dict, delta: memoryview, start: int, codec: str, fmt: int, old: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """One tensor of a delta: its entry `e` of the header, decoded against `old`."""
    try:
        dtype, shape, mode = _dtype(e["dtype"]), [int(s) for s in e["shape"]], e["mode"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        lo, hi = start + int(e["offset"]), start + int(e["offset"]) + int(e["length"])
        if hi > len(delta) or lo < start or hi < lo:
            raise DeltaError(f"{e['name']}: payload runs past the end of the delta")
        # a view: slicing it (the modes' parts) copies nothing
        payload = memoryview(_decompress(codec, delta[lo:hi], int(e["raw_length"])) if e["length"] else b"")
        if mode == "raw":
            if len(payload) != numel * itemsize:
                raise DeltaError(f"{e['name']}: raw payload has the wrong size")
            return _tensor(_unshuffle(payload, itemsize), dtype, shape, copy=False)
        base = old.get(e["name"])
        if base is None or base.dtype != dtype or list(base.shape) != shape:
            raise DeltaError(f"{e['name']}: missing from the base or of another dtype/shape")
        base_raw = _raw(base)
        if mode == "same":
            return _tensor(base_raw, dtype, shape)
        if mode == "xor":
            if len(payload) != numel * itemsize:
                raise DeltaError(f"{e['name']}: xor payload has the wrong size")
            flat = _unshuffle(payload, itemsize)
            np.bitwise_xor(flat, base_raw, out=flat)
            return _tensor(flat, dtype, shape, copy=False)
        if mode == "sparse":
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
            return _tensor(flat.reshape(-1), dtype, shape, copy=False)
        if mode == "bitmap" and itemsize in _UINT and fmt >= _MODES_SINCE["bitmap"]:
            u = _UINT[itemsize]
            new_flat = _apply_bitmap(base_raw.view(u), payload, int(e["count"]), dtype, e["name"])
            return _tensor(new_flat.view(np.uint8), dtype, shape, copy=False)
        if mode in ("rice", "ricesm") and itemsize in _UINT and dtype in _MANTISSA_BITS and fmt >= _MODES_SINCE[mode]:
            u = _UINT[itemsize]
            values = "signmag" if mode == "ricesm" else "zigzag"
            new_flat = _apply_rice(base_raw.view(u), payload, int(e["count"]), dtype, e["name"], values)
            return _tensor(new_flat.view(np.uint8), dtype, shape, copy=False)
        raise DeltaError(f"{e['name']}: unknown mode {mode!r}")
    except DeltaError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DeltaError(f"malformed delta: {exc!r}") from None


def apply(
    old: Mapping[str, torch.Tensor],
    delta: bytes,
    *,
    verify_base: bool = True,
    verify_result: bool = True,
    threads: int = 1,
    base_sha256: str | None = None,
) -> dict[str, torch.Tensor]:
    """The weights `delta` encodes, given the `old` weights it was made against.

    Checks the base checksum first and the result's checksum last; raises `DeltaError`.
    `base_sha256`: the checksum of `old` when the caller already knows it (it is then
    compared with the header instead of hashing `old` again). `threads`: how many
    tensors to decode at once (1: no thread pool); the result does not depend on it.
    With threads, the result's checksum is computed tensor by tensor while later
    tensors still decode. The default is 1: on a 2-core box shared by replicas, 2-4
    threads cut the wall time of an fp32 SmolLM2 delta by 0-25% but cost 15-30% more
    CPU seconds (memory-bound kernels and allocations contend)."""
    header = read_header(delta)
    fmt = _FORMATS[delta[: len(MAGIC)]]
    if header.get("format", 1) != fmt:
        raise DeltaError(f"delta format {header.get('format')!r} does not match its magic")
    if verify_base and (base_sha256 or weights_sha256(old)) != header.get("base_sha256"):
        raise DeltaError("delta does not apply to these weights (base checksum differs)")
    start = header["_payload_start"]
    try:
        codec = header["codec"]
        entries = header["tensors"]
        if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("name"), str) for e in entries
        ):
            raise DeltaError("malformed delta: tensors must be a list of entries with a name")
    except (KeyError, TypeError) as exc:
        raise DeltaError(f"malformed delta: {exc!r}") from None
    view = memoryview(delta)
    threads = max(1, int(threads))
    h = hashlib.sha256()
    out: dict[str, torch.Tensor] = {}
    if threads == 1 or len(entries) < 2:
        for e in entries:
            out[e["name"]] = _decode_entry(e, view, start, codec, fmt, old)
        if verify_result:
            for name in sorted(out):
                _hash_tensor(h, name, out[name])
    else:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="delta-apply") as pool:
            futures = {e["name"]: pool.submit(_decode_entry, e, view, start, codec, fmt, old) for e in entries}
            try:
                for name in sorted(futures):  # the checksum's order: hash while the rest decodes
                    out[name] = futures[name].result()
                    if verify_result:
                        _hash_tensor(h, name, out[name])
            except BaseException:
                for f in futures.values():
                    f.cancel()
                raise
    if verify_result and h.hexdigest() != header.get("new_sha256"):
        raise DeltaError("reconstructed weights do not match the delta's checksum")
    return out


def warm_up() -> None:
    """Encode and decode a tiny delta per float dtype: numba's import and the loading (or
    compiling) of the kernels, paid once per process, so that the first real update does
    not wait for them (a replica calls this as its loader thread starts)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        old = {"w": (torch.randn(64, 80, generator=g) * 0.05).to(dtype)}
        new = {"w": (old["w"].double() - 1e-4 * torch.randn(64, 80, generator=g, dtype=torch.float64)).to(dtype)}
        apply(old, encode(old, new))
