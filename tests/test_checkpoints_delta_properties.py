"""Property-based round trips of the delta codec: any dtype, shape and change pattern
(none, sparse, dense, a few ulps, special floats) must come back bit for bit, and a
flipped byte anywhere in a delta must not go unnoticed."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.checkpoints import delta

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]
SHAPES = [(), (0,), (0, 3), (1,), (7,), (3, 5), (2, 3, 5), (65,), (64, 65), (4097,), (33, 129)]
"""0-d, empty, odd sizes, and tensors large enough (>= BITMAP_MIN_NUMEL) for `bitmap` mode."""
SPECIAL_BITS = {
    torch.float32: [0x7FC00001, 0xFFC00000, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001, 0x7F7FFFFF],
    torch.float16: [0x7E01, 0xFE00, 0x8000, 0x7C00, 0xFC00, 0x0001, 0x7BFF],
    torch.bfloat16: [0x7FC1, 0xFFC0, 0x8000, 0x7F80, 0xFF80, 0x0001, 0x7F7F],
    torch.float64: [0x7FF8000000000001, 0x8000000000000000, 0x7FF0000000000000, 0xFFF0000000000000, 1],
}
"""NaN with a payload, negative NaN, -0.0, +inf, -inf, the smallest denormal, the largest finite."""


def _bytes(t: torch.Tensor) -> bytes:
    if t.numel() == 0:
        return b""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_bytes(raw: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if raw.size == 0:
        return torch.empty(shape, dtype=dtype)
    if dtype == torch.bool:  # only 0/1 are valid bools
        return torch.from_numpy((raw & 1).astype(np.bool_)).reshape(shape)
    return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)


@st.composite
def tensor_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    """(old, new) of one dtype and shape; new differs from old in a drawn pattern."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.sampled_from(SHAPES))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape, dtype=np.int64))
    kind = draw(st.sampled_from(["random_bits", "normal"]))
    if kind == "normal" and dtype.is_floating_point:
        old = torch.from_numpy(rng.standard_normal(numel).astype(np.float32) * 0.05).to(dtype).reshape(shape)
    else:
        old = _from_bytes(rng.integers(0, 256, numel * itemsize, dtype=np.uint8), dtype, shape)
    flat_bits = np.frombuffer(_bytes(old), dtype=np.uint8).copy().reshape(numel, itemsize)
    change = draw(st.sampled_from(["none", "sparse", "dense", "ulps", "special"]))
    if numel and change == "sparse":
        idx = rng.choice(numel, size=draw(st.integers(1, max(1, numel // 8))), replace=False)
        flat_bits[idx] = rng.integers(0, 256, (idx.size, itemsize), dtype=np.uint8)
    elif numel and change == "dense":
        flat_bits = rng.integers(0, 256, (numel, itemsize), dtype=np.uint8)
    elif numel and change == "ulps" and itemsize in (1, 2, 4, 8):
        # A small optimiser-like step: some elements move by a few units of the last
        # place, in either direction (wrapping at the ends of the integer range).
        u = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
        step = rng.integers(-3, 4, numel).astype(np.int64).astype(u)
        step[rng.random(numel) < draw(st.floats(0.0, 1.0))] = 0
        flat_bits = (flat_bits.reshape(-1).view(u) + step).view(np.uint8).reshape(numel, itemsize)
    elif numel and change == "special" and dtype in SPECIAL_BITS:
        specials = SPECIAL_BITS[dtype]
        idx = rng.choice(numel, size=min(numel, len(specials)), replace=False)
        u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize]
        words = flat_bits.reshape(-1).view(u)
        words[idx] = np.array(specials[: idx.size], dtype=u)
        flat_bits = words.view(np.uint8).reshape(numel, itemsize)
    new = _from_bytes(flat_bits.reshape(-1), dtype, shape)
    return old, new


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pairs=st.lists(tensor_pairs(), min_size=1, max_size=4),
    codec=st.sampled_from(["zlib", delta.default_codec()]),
    drop_one=st.booleans(),
    add_one=st.booleans(),
)
def test_round_trip_is_bit_exact(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], codec: str, drop_one: bool, add_one: bool
) -> None:
    old = {f"t{i}": o for i, (o, _) in enumerate(pairs)}
    new = {f"t{i}": n for i, (_, n) in enumerate(pairs)}
    if drop_one and len(new) > 1:
        del new["t0"]
    if add_one:  # a new name (raw mode), of a dtype/shape another tensor has
        new["added"] = pairs[-1][1].clone()
    blob = delta.encode(old, new, codec=codec)
    out = delta.apply(old, blob)
    assert delta.same_bits(out, new)
    assert delta.weights_sha256(out) == delta.weights_sha256(new)
    modes = {e["name"]: e["mode"] for e in delta.read_header(blob)["tensors"]}
    for name, t in new.items():
        if name in old and _bytes(old[name]) == _bytes(t):
            assert modes[name] == "same"


@settings(max_examples=150, deadline=None)
@given(pair=tensor_pairs(), codec=st.sampled_from(["zlib", delta.default_codec()]), data=st.data())
def test_a_flipped_byte_is_detected(pair: tuple[torch.Tensor, torch.Tensor], codec: str, data: st.DataObject) -> None:
    old, new = pair
    blob = delta.encode({"w": old, "b": torch.arange(5)}, {"w": new, "b": torch.arange(5)}, codec=codec)
    pos = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(blob)
    bad[pos] ^= flip
    try:
        out = delta.apply({"w": old, "b": torch.arange(5)}, bytes(bad))
    except delta.DeltaError:
        return
    # Not refused: only acceptable when the flip was in bytes the decoder ignores
    # (e.g. a zstd frame header field) and the result is still exactly `new`, which
    # the result checksum has then verified.
    assert delta.same_bits(out, {"w": new, "b": torch.arange(5)})
    start = delta.read_header(blob)["_payload_start"]
    assert codec != "zlib" or pos < start, "a flip in a zlib payload went unnoticed"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_small_steps_use_bitmap_mode_and_compress(dtype: torch.dtype) -> None:
    """A tiny step that moves only small-magnitude elements: `bitmap` mode, and much
    smaller than the tensor."""
    g = torch.Generator().manual_seed(0)
    old = (torch.randn(256, 256, generator=g) * 0.05).to(dtype)
    master = old.double() - 1e-4 * torch.sign(torch.randn(256, 256, generator=g, dtype=torch.float64))
    new = master.to(dtype)
    blob = delta.encode({"w": old}, {"w": new})
    assert delta.same_bits(delta.apply({"w": old}, blob), {"w": new})
    (entry,) = delta.read_header(blob)["tensors"]
    assert entry["mode"] in ("bitmap", "rice", "ricesm")
    assert len(blob) < old.numel() * old.element_size() / 4


@pytest.mark.parametrize("values", ["zigzag", "signmag"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("step", [1e-6, 1e-4, 1e-2])
def test_rice_mode_round_trips(dtype: torch.dtype, step: float, values: str) -> None:
    """`rice`/`ricesm` code the change map per exponent class: bit-exact whatever fraction
    moved (none, few, most, all of a class), with either coding of the differences; a
    truncated payload is refused."""
    g = torch.Generator().manual_seed(1)
    old = (torch.randn(128, 300, generator=g) * 0.05).to(dtype)
    old[0, :50] = 0.0  # a class (zero) that does not move at all...
    master = old.double() - step * torch.sign(torch.randn(128, 300, generator=g, dtype=torch.float64))
    master[0, :50] = 1e-30  # ...that moves entirely (denormals for the narrow types)
    new = master.to(dtype)
    u = delta._UINT[old.element_size()]
    a, b = delta._raw(old).view(u), delta._raw(new).view(u)
    payload, count = delta._rice_payload(a, b, dtype, values)
    assert count == int((a != b).sum())
    back = delta._apply_rice(a, payload, count, dtype, "w", values)
    assert np.array_equal(back, b)
    with pytest.raises(delta.DeltaError):
        delta._apply_rice(a, payload[:-1], count, dtype, "w", values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_signmag_values_cover_every_difference(dtype: torch.dtype) -> None:
    """Sign-magnitude differences: +-1, magnitudes past the one-byte escape (255 and
    more), the largest (-2**(bits-1), a sign flip of the bits) and wraps round trip."""
    u = delta._UINT[torch.empty((), dtype=dtype).element_size()]
    nbits = 8 * np.dtype(u).itemsize
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**nbits - 1, 4096, dtype=np.uint64, endpoint=True).astype(u)
    steps = [1, -1, 2, -2, 255, -255, 256, -256, 257, 70000 % 2**nbits, 2 ** (nbits - 1), 2**nbits - 1]
    steps = [x % 2**nbits for x in steps]  # as the unsigned difference mod 2**bits
    d = np.array(steps * (4096 // len(steps)) + steps[: 4096 % len(steps)], dtype=np.uint64).astype(u)
    new = base + d
    data = delta._signmag_values(base, new)
    assert np.array_equal(delta._read_signmag(data, base.size, u, "w"), d)
    with pytest.raises(delta.DeltaError):
        delta._read_signmag(data[:-1], base.size, u, "w")
    with pytest.raises(delta.DeltaError):
        delta._read_signmag(data + b"\0", base.size, u, "w")


def test_signmag_beats_zigzag_on_one_ulp_steps() -> None:
    """A bf16 publish of a small step (most changed elements move +-1 ulp): `ricesm` is
    chosen, and is smaller than `rice` of the same change."""
    g = torch.Generator().manual_seed(2)
    master = torch.randn(512, 512, generator=g) * 0.05
    old = master.to(torch.bfloat16)
    new = (master - 5e-5 * torch.sign(torch.randn(512, 512, generator=g))).to(torch.bfloat16)
    blob = delta.encode({"w": old}, {"w": new})
    (entry,) = delta.read_header(blob)["tensors"]
    assert entry["mode"] == "ricesm"
    assert delta.same_bits(delta.apply({"w": old}, blob), {"w": new})
    a, b = delta._raw(old).view(np.uint16), delta._raw(new).view(np.uint16)
    zz, _ = delta._rice_payload(a, b, torch.bfloat16, "zigzag")
    assert entry["length"] < len(delta._compress(delta.default_codec(), zz))


def test_format_2_deltas_still_apply() -> None:
    """A format-2 delta (no `rice` mode) still decodes; `rice` under the format-2 magic is
    refused."""
    old = {"w": torch.randn(10, 10), "b": (torch.randn(128, 64) * 0.05).to(torch.bfloat16)}
    new = {"w": old["w"] + 1e-3, "b": (old["b"].double() - 1e-4).to(torch.bfloat16)}
    blob = delta.encode(old, new)
    modes = {e["mode"] for e in delta.read_header(blob)["tensors"]}
    head = delta.read_header(blob)
    start = head.pop("_payload_start")
    head["format"] = 2
    body = json.dumps(head, separators=(",", ":")).encode()
    v2 = delta.MAGIC_V2 + struct.pack("<I", len(body)) + body + blob[start:]
    if modes & {"rice", "ricesm"}:
        with pytest.raises(delta.DeltaError, match="unknown mode"):
            delta.apply(old, v2)
    else:
        assert delta.same_bits(delta.apply(old, v2), new)
    new["b"] = old["b"].clone()  # modes every format has
    blob = delta.encode(old, new)
    head = delta.read_header(blob)
    start = head.pop("_payload_start")
    head["format"] = 2
    body = json.dumps(head, separators=(",", ":")).encode()
    v2 = delta.MAGIC_V2 + struct.pack("<I", len(body)) + body + blob[start:]
    assert delta.same_bits(delta.apply(old, v2), new)


def test_format_1_deltas_still_apply() -> None:
    """A format-1 delta (no `bitmap` mode) still decodes; `bitmap` under the format-1
    magic is refused."""
    old = {"w": torch.randn(10, 10), "b": (torch.randn(128, 64) * 0.05).to(torch.bfloat16)}
    new = {"w": old["w"] + 1e-3, "b": old["b"].clone()}
    blob = delta.encode(old, new)
    head = delta.read_header(blob)
    del head["format"], head["_payload_start"]
    body = json.dumps(head, separators=(",", ":")).encode()
    v1 = delta.MAGIC_V1 + struct.pack("<I", len(body)) + body + blob[delta.read_header(blob)["_payload_start"] :]
    assert delta.same_bits(delta.apply(old, v1), new)
    new["b"] = (old["b"].double() - 1e-4).to(torch.bfloat16)
    blob = delta.encode(old, new)
    assert {e["mode"] for e in delta.read_header(blob)["tensors"]} & {"bitmap", "rice", "ricesm"}
    with pytest.raises(delta.DeltaError):  # a newer format under the format-1 magic
        delta.apply(old, delta.MAGIC_V1 + blob[len(delta.MAGIC) :])


def test_format_3_deltas_still_apply() -> None:
    """A format-3 delta (`rice`, no `ricesm`) still decodes; `ricesm` under the format-3
    magic is refused."""
    g = torch.Generator().manual_seed(3)
    master = torch.randn(256, 256, generator=g) * 0.05
    old = {"w": master.to(torch.bfloat16)}
    new = {"w": (master - 5e-5 * torch.sign(torch.randn(256, 256, generator=g))).to(torch.bfloat16)}
    u = delta._UINT[2]
    payload, count = delta._rice_payload(delta._raw(old["w"]).view(u), delta._raw(new["w"]).view(u), torch.bfloat16)
    data = delta._compress(delta.default_codec(), payload)
    entry = {"name": "w", "dtype": "bfloat16", "shape": [256, 256], "mode": "rice", "count": count}
    entry.update(raw_length=len(payload), offset=0, length=len(data))
    head = {
        "format": 3,
        "codec": delta.default_codec(),
        "base_sha256": delta.weights_sha256(old),
        "new_sha256": delta.weights_sha256(new),
        "tensors": [entry],
    }
    body = json.dumps(head, separators=(",", ":")).encode()
    v3 = delta.MAGIC_V3 + struct.pack("<I", len(body)) + body + data
    assert delta.same_bits(delta.apply(old, v3), new)
    blob = delta.encode(old, new)
    assert delta.read_header(blob)["tensors"][0]["mode"] == "ricesm"
    head = delta.read_header(blob)
    start = head.pop("_payload_start")
    head["format"] = 3
    body = json.dumps(head, separators=(",", ":")).encode()
    with pytest.raises(delta.DeltaError, match="unknown mode"):
        delta.apply(old, delta.MAGIC_V3 + struct.pack("<I", len(body)) + body + blob[start:])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int32])
def test_encode_builds_the_same_payloads_as_each_mode_alone(dtype: torch.dtype) -> None:
    """`encode` builds `bitmap`, `rice` and `ricesm` from one shared order and change map:
    byte for byte what each mode's own function writes (floats get all three)."""
    g = torch.Generator().manual_seed(4)
    if dtype.is_floating_point:
        master = torch.randn(96, 64, generator=g) * 0.05
        old, new = master.to(dtype), (master - 1e-4 * torch.sign(torch.randn(96, 64, generator=g))).to(dtype)
    else:
        old = torch.randint(0, 1000, (96, 64), generator=g, dtype=dtype)
        new = old + torch.randint(-1, 2, (96, 64), generator=g, dtype=dtype)
    u = delta._UINT[old.element_size()]
    a, b = delta._raw(old).view(u), delta._raw(new).view(u)
    payloads, count = delta._ordered_payloads(a, b, dtype)
    assert count == int((a != b).sum())
    assert payloads["bitmap"] == delta._bitmap_payload(a, b, dtype)[0]
    if dtype.is_floating_point:
        assert payloads["rice"] == delta._rice_payload(a, b, dtype, "zigzag")[0]
        assert payloads["ricesm"] == delta._rice_payload(a, b, dtype, "signmag")[0]
    else:
        assert payloads.keys() == {"bitmap"}
