"""The delta codec: bit-exact round trips (NaN payloads, -0.0, new/dropped tensors) and
corruption detection."""

from __future__ import annotations

import struct

import pytest
import torch

from services.checkpoints import delta


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "dense": torch.randn(64, 32, generator=g),
        "half": torch.randn(100, generator=g).to(torch.bfloat16),
        "fp16": torch.randn(7, 3, generator=g).to(torch.float16),
        "ints": torch.arange(50, dtype=torch.int64),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "mask": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("codec", ["zlib", delta.default_codec()])
def test_round_trip_is_bit_exact(codec: str) -> None:
    old = _weights()
    new = {k: v.clone() for k, v in old.items()}
    new["dense"] += 1e-3 * torch.randn_like(new["dense"])  # every element: xor mode
    new["half"][3] = 0.5  # one element: sparse mode
    new["fp16"][0, 0] = float("nan")
    nan_payload = torch.tensor([0x7FC00001], dtype=torch.int32).view(torch.float32)
    new["dense"][0, 0] = nan_payload[0]
    new["dense"][0, 1] = -0.0
    new["dense"][0, 2] = float("-inf")
    new["ints"][[1, 40]] = -7
    del new["mask"]  # dropped
    new["added"] = torch.randn(5, 5)  # raw mode
    new["scalar"] = torch.tensor(3.5, dtype=torch.float64)  # dtype change: raw
    blob = delta.encode(old, new, codec=codec)
    header = delta.read_header(blob)
    modes = {e["name"]: e["mode"] for e in header["tensors"]}
    assert modes == {
        "dense": "xor",
        "half": "sparse",
        "fp16": "sparse",
        "ints": "sparse",
        "empty": "same",
        "added": "raw",
        "scalar": "raw",
    }
    out = delta.apply(old, blob)
    assert delta.same_bits(out, new)
    assert out["dense"].view(torch.int32)[0, 0].item() == 0x7FC00001  # NaN payload kept
    assert torch.signbit(out["dense"][0, 1])
    assert delta.weights_sha256(out) == delta.weights_sha256(new)


def test_unchanged_weights_give_a_tiny_delta() -> None:
    old = {"w": torch.randn(256, 256)}
    blob = delta.encode(old, {"w": old["w"].clone()})
    assert len(blob) < 1000
    assert delta.same_bits(delta.apply(old, blob), old)


def test_sparse_change_is_much_smaller_than_the_tensor() -> None:
    old = {"w": torch.randn(512, 512)}
    new = {"w": old["w"].clone()}
    new["w"].view(-1)[::1000] += 1.0
    blob = delta.encode(old, new)
    assert len(blob) < old["w"].numel() * 4 / 50
    assert delta.same_bits(delta.apply(old, blob), new)


def test_checksum_depends_on_name_dtype_shape_and_bits() -> None:
    w = {"a": torch.zeros(4)}
    base = delta.weights_sha256(w)
    assert delta.weights_sha256({"a": torch.zeros(4)}) == base
    assert delta.weights_sha256({"b": torch.zeros(4)}) != base
    assert delta.weights_sha256({"a": torch.zeros(2, 2)}) != base
    assert delta.weights_sha256({"a": torch.zeros(4, dtype=torch.int32)}) != base
    assert delta.weights_sha256({"a": torch.tensor([0.0, 0.0, 0.0, -0.0])}) != base


def test_corrupted_delta_is_detected() -> None:
    old = _weights()
    new = {k: v.clone() for k, v in old.items()}
    new["dense"] *= 1.01
    blob = delta.encode(old, new, codec="zlib")
    header = delta.read_header(blob)
    start = header["_payload_start"]
    # A flipped byte in a payload: decompression or the result checksum fails.
    flipped = bytearray(blob)
    flipped[start + 20] ^= 0xFF
    with pytest.raises(delta.DeltaError):
        delta.apply(old, bytes(flipped))
    # Truncated, wrong magic, garbage header.
    with pytest.raises(delta.DeltaError):
        delta.apply(old, blob[: len(blob) // 2])
    with pytest.raises(delta.DeltaError):
        delta.apply(old, b"XX" + blob[2:])
    bad_head = delta.MAGIC + struct.pack("<I", 5) + b"{nope"
    with pytest.raises(delta.DeltaError):
        delta.apply(old, bad_head)


def test_delta_refuses_the_wrong_base() -> None:
    old = _weights(0)
    new = {k: v.clone() for k, v in old.items()}
    new["dense"] += 1
    blob = delta.encode(old, new)
    with pytest.raises(delta.DeltaError, match="base checksum"):
        delta.apply(_weights(1), blob)
