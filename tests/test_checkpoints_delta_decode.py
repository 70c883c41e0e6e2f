"""The delta decoder's fast paths: the numba kernels and the numpy fallback give the same
bytes, decoding in threads gives the same result and still refuses corrupt deltas, and a
delta written by the encoder as it was before these paths existed still decodes."""

from __future__ import annotations

import base64
import hashlib

import numpy as np
import pytest
import torch

from services.checkpoints import delta

FORMAT4_FIXTURE = base64.b64decode(
    "UkxGREVMVEE0ChMDAAB7ImZvcm1hdCI6NCwiY29kZWMiOiJ6bGliIiwiYmFzZV9zaGEyNTYiOiI4MWRjMjIzMzk0Y2YyMWIwOGVm"
    "MjUwZDdkMGM2MzQyNTlkYTUzYTg5MDBiMTBhMTlkYjJhNTQxN2JkMzliNTVhIiwibmV3X3NoYTI1NiI6ImQ0NzZhZDQwYzQ2ZTdj"
    "MzE3YTI0MDE3NmYyZmQ5N2EwMmU5ZDc5ZGQwNTc5NWE1ZWMxNWZmOTg5ZjA5NDdhYzUiLCJ0ZW5zb3JzIjpbeyJuYW1lIjoiaW50"
    "cyIsImR0eXBlIjoiaW50MzIiLCJzaGFwZSI6WzUwMDBdLCJtb2RlIjoiYml0bWFwIiwiY291bnQiOjcxNSwicmF3X2xlbmd0aCI6"
    "MzQ4NSwib2Zmc2V0IjowLCJsZW5ndGgiOjQzfSx7Im5hbWUiOiJrZWVwIiwiZHR5cGUiOiJmbG9hdDMyIiwic2hhcGUiOls0LDk2"
    "XSwibW9kZSI6InNhbWUiLCJyYXdfbGVuZ3RoIjowLCJvZmZzZXQiOjQzLCJsZW5ndGgiOjB9LHsibmFtZSI6InBhcnQiLCJkdHlw"
    "ZSI6ImZsb2F0MzIiLCJzaGFwZSI6WzcyLDY0XSwibW9kZSI6InJpY2VzbSIsImNvdW50IjozNjAwLCJyYXdfbGVuZ3RoIjo0MTg4"
    "LCJvZmZzZXQiOjQzLCJsZW5ndGgiOjU4MX0seyJuYW1lIjoidzE2IiwiZHR5cGUiOiJiZmxvYXQxNiIsInNoYXBlIjpbODAsNjRd"
    "LCJtb2RlIjoicmljZXNtIiwiY291bnQiOjIwNDAsInJhd19sZW5ndGgiOjI3ODcsIm9mZnNldCI6NjI0LCJsZW5ndGgiOjk5Mn0s"
    "eyJuYW1lIjoidzMyIiwiZHR5cGUiOiJmbG9hdDMyIiwic2hhcGUiOls2NCw5Nl0sIm1vZGUiOiJyaWNlc20iLCJjb3VudCI6NjE0"
    "NCwicmF3X2xlbmd0aCI6MzEyOTAsIm9mZnNldCI6MTYxNiwibGVuZ3RoIjoxMDY1fV19eJxrZGLhEFBwaBylRim6UKNgFAwTwDAK"
    "RsEoGAWjYBSMglFAbQAA+PVewXicY2JgYGAFYg4g5gNicSCWA2IvIO4GYhlGBgZhJgYGXhYGhrUghXjBX4Na/b93SpO/2Jx1+iJy"
    "+XB9hMAyrXiDiUv2y3qVX5h+r1Q/Xr1sc6L8zVkKZ+67JTt8YTQK7zS5uKbi9j4X3sT0r1cUWHK3m1xuqrzLaNiivNvtueP2vQV9"
    "HVz6KjXzOv3l2aSWn7ie7eE8SYJRcOm79fz6gXKbYx50PhaZGNrOHBDUrnBew+F/4fK8r/mm5ueNE0y2W9/cIaHxKXnT/3d5+TMu"
    "J4nud7Gv3Od6u2+xXKmR5MKj1yeHxsm82XRHvLdmbj3f313tld9VDBuMPgVEG7NIK0helH7ceNW0PKn2bO0O2TjHKabnzSPXX+kv"
    "sf5U9E3LrGvOgujvudol2b3bj06vN7+XrHXmpfTVfUycs6M0tz+9v2bq/PSSRX1ejwxPHrqR77vlrECDYFGR38fj/u839P34UX/E"
    "gI3biLv3xaZyL7FDHF0x3+VXLHR5t77aZcVH90+dhty+Rd/2NrvWdl9+895vz97Prslau5lLdrTwNLQ2ftFWf9W9huWB8fKZd0Mf"
    "7byuonHF0/T8nNrbsm+T+HdO/358z988eZ/vj5Pj7EJORj1cu7Plu+SHuq6pGw/cbv+SeIv3eqvwnDW8cvPzjDcG3fkTm/uoxKzx"
    "geXsHSfDRQ3+o4IOFOCCHSjiBQJUAxyDBzCPApyAcRSMAlRAqN4YBaNgFIyCUTAKRsEoGAWDBXh7q4KAEBSwsDCBAHHtOgDd8ROa"
    "eJxjZGBgYAJiNijmA2IeINYA4kAg7gfiBEaIoptA2gyIg4FcVgZkwMTAxMzMxgHhSIewXJi5l/8Wl861FXv2r+r4nzJdNtllXsj9"
    "JssJ78rXVk/x/62/8G7cF90wN6sZa7cKsQm1uwoEZzA4MiyOcXVQZ1lWybGrwcpr+YVIBjNp3UetFWVe35/9UWCY6Vnf9LZQk22b"
    "AOOHDGfHyI9PHbkO7SxIYFYUVl1ysmPOTQU18zAWRsP5OuETF3I3zpA4ktS7iHPHQg7hSZum2L90YmhjeHSgjk9boGFut1J24d6l"
    "X8rn59WV3Z7+QU15Kd/BfyGPbsdNYplvFHU/Nl/x9KfQ5x84Zczui905sDv96YHq0gtTZv5d9Gre0v1T68Pq/u+9tXzJm/Bj/548"
    "YZRafIjVaKm5pfwN8X9yMxqlXXRW/AoIvMlo4tOpsk7UqWh5hMNhSVVFx+aG2QFZRYIiajKem+IdI1qWsx5ZpdDdzVbnmtP8WaEx"
    "wS1QYUOzE3uoTICiw7sgJq91NXx3PRY/PavsuPi4qVPkR3cFE2WBlRWMJ3ZYtD5i0Jl6TPJx0uGDTT+WmsadCLi4MYAr8YNmj+36"
    "Ur61LA4Xtx6KrHDg2bDURcHffv1yjhivoj7VFV/qY/S6Ch0n+O4KPGXxuC2ou+BQWuLHTrcm5iq57dfN2EMa3FnUD/hLccopZaxw"
    "uG+WvuJgUvWt91WhvzSFXzMXvNa4KdzPYbXgpKBhkuXc4yfeCbu3LLIycYnlieKLlNG6tSr6LWt6J/+aGu6LM4pbHKK7hZfm+93f"
    "7Lqlui1xnlDyIqM6xlvvr3cW3N3q4M73auZdkesLH2Z16J954C3MVds/8YBQ0z7Tlctjrv1ru9LnK1j6PmTnRFfZDxnlFW8ZVR64"
    "X5psdk2rcI3kndStpjMd+pT+ybjmZXy/OyumP6w3h/fot33hn1ytbpbfFw5MSk82+Cwr8B8I2kCEb0bK800x0ibqScaaJsbGQMLE"
    "RBIKZCWFJXl5eLh4eNh4oADIFeLh5xEDc/iAXBDk4eXlYWVjY2NlBSIQgw3MA3NY2aCIDSYOFYAJQdUi8cHGsDEBcw0QM4EwiAVh"
    "MEEYIMAElQZLQOUYoQIwHTA2Eg8qBSfRdMANRVgJFoJmZkYoYABjCAlBDMgMmBJGEA+qDSbPCNUKkwergCKIAJjDiATAXLA0A7Ip"
    "cAsZoOYwInGhShHmwLQywO2HyjIwwPzBgOpGmPMg7oF6F+oWBiRFjDCbYSbD/MvIhHAiiocww4SBfoCedo2CUTAKRsFgAUkbWOYo"
    "rmq0ZKxnrKuvq6sHACjuRb54nO3caTDcdxzH8f/aWHFt2ESwHcnYMI1SJuI+RkUSIkWQxpGNo45IrG6ptEljJ6KkFRt3GuqK2NoG"
    "jaiIo+poKUVFa5CyDYa4SmwS3agaulP6rMxkJhFjPq+Z97Pvg++j38zv9+BHIghCQhxFnJQ4ZXG64rzFtYljkQiCSiYIjiRBpIkH"
    "ijYRxAFiJe+F+oU9uBN0oerEQimFG6jirJjwbhu7kTE28cExuam+eeHgwmhyRsKC9dfUuPNKBhqxkq5alYYMa6OPSlUpLa/pKjK4"
    "wj8m5Dz2dfz4YW4LjX2pRaWls8IsdHC4vcbXUdrt92QliRTPhZHKiDFrIk5V9mKdonmrv0jF5LeuyS9ePxcwVkbUsZTVko575Yd8"
    "73L3XiQ9xO/TgGu637iHDJ+dydzqVFhnn3t50Kqgt135Fq87nW78bej76VGG3NvRn4SM8a5/NuJ18E2/Mx1ypdF2NA+OUzQvzb+H"
    "tL+Tp+7UHECh8/YIO3azCjI5moe8zfzcwxcG528+DjZodfSqERXoxwpOsqovTWmXl1TOmP0iX//IpiONNldX7NBLLL4xXt+tcerz"
    "GKdNF1RuP50J26w8Mu5SWksXJKokdU9Wx1NTJbQGZrcpmMVRHZOzvc0qb7mwnfuSnXu0KsrGWwSMRVkrPamhHSHGdhenPdUEAunx"
    "Qf2nLocOE87zd83ULwdacbk+8QnXDciT7aSi8OhfBTt7EniPVM7xAkV79jJTbXROc6iJMUKL1qC5P8ntkXnBzJwkw7ABm2mTLtYT"
    "T4UtRv399vvOH6zK6gxJnL9BirHj01k6YUfVJfNTCx0FV1ibHXTd9aWDwralhA9s39omLPbmuu8sO5xTvqvWQVejY8u90aa9xs1s"
    "jWg92QcTCkNSsZpGTP4PZ+fvlN03JG2n7Y5wl49zrTJ6+JfbSNTP/pmxhc9uONqTO3bYNtVlyPDq+RHM+7V+2nFHZtn8Skt9rie5"
    "K+OMXMPMdFb/1GnXPmbJd/GcxlmfmqZdJP1sSuNgqWii3XcoIdfDS9kzNaXO9K1Ekysm1x6KOCPF+4fzvrJVrc5SDGA1EOplthNG"
    "Qi1TC75ainm6OY+a+TE7I60142SjTkVRxUiFzBM3qXKyU1ahuvmztwfidfJkzDWSs5m6mnPyelHaMgO+lq1Sor+PH6PJaeU1R56i"
    "NZVkMnqzHHKUKoIZdIFFvc+Bd/iPLY8Ii0bpvpon2F8uAgAAAAAAAAAAAADAetL8Igybmmb+y2FJ/v9zfS43X66jG4gWrJlUAFhm"
    "DwAAa08DAAAA1o1kWGb5qhcAgFU0XL26dJnQXLLC2E/Pxf/l0t9AVGHNyAHAMgoAAKw9MgAAAKwbJFgm8aoXAIBVmPz3hrP62bXi"
    "r1UAAAAAAAAAAAAAAAAAAAAAAAAAAAAAABvXP8MwV6U="
)
"""A format-4 delta (modes ricesm, bitmap, same; zlib) written by the encoder of commit
7a8c3fc from `_fixture_weights()`, before the decoder's numba and threaded paths."""
FORMAT4_FIXTURE_SHA256 = "21da66e27d41419b095bee6967e4ecf7eb3f4324253178f29680f460bde3251f"


def _fixture_weights() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The weights the format-4 fixture was encoded from (numpy's PCG64 streams are stable)."""
    rng = np.random.default_rng(20261124)
    m32 = (rng.standard_normal((64, 96)) * 0.05).astype(np.float32)
    m16 = (rng.standard_normal((80, 64)) * 0.05).astype(np.float32)
    old = {
        "w32": torch.from_numpy(m32.copy()),
        "w16": torch.from_numpy(m16.copy()).to(torch.bfloat16),
        "ints": torch.from_numpy(np.arange(5000, dtype=np.int32)),
        "keep": torch.from_numpy(m32[:4].copy()),
    }
    s32 = np.sign(rng.standard_normal((64, 96))).astype(np.float32)
    s16 = np.sign(rng.standard_normal((80, 64))).astype(np.float32)
    new = {
        "w32": torch.from_numpy(m32 - 3e-6 * s32),
        "w16": torch.from_numpy(m16 - 5e-5 * s16).to(torch.bfloat16),
        "ints": torch.from_numpy(np.arange(5000, dtype=np.int32) + (np.arange(5000) % 7 == 0)),
        "keep": old["keep"].clone(),
    }
    m2 = (rng.standard_normal((72, 64)) * 0.05).astype(np.float32)
    old["part"] = torch.from_numpy(m2.copy())  # only the small-magnitude classes move
    new["part"] = torch.from_numpy(m2 - 2e-9 * np.sign(rng.standard_normal((72, 64))).astype(np.float32))
    return old, new


@pytest.fixture(params=["numba", "numpy"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once through the numba kernels (skipped without numba) and once
    through the numpy fallback."""
    if request.param == "numba":
        pytest.importorskip("numba")
        monkeypatch.setattr(delta, "USE_NUMBA", True)
        assert delta._kernels() is not None
    else:
        monkeypatch.setattr(delta, "USE_NUMBA", False)
        assert delta._kernels() is None
    return request.param


def test_the_fixture_of_the_old_encoder_still_decodes(path: str) -> None:
    assert hashlib.sha256(FORMAT4_FIXTURE).hexdigest() == FORMAT4_FIXTURE_SHA256
    old, new = _fixture_weights()
    modes = {e["name"]: e["mode"] for e in delta.read_header(FORMAT4_FIXTURE)["tensors"]}
    assert modes == {"ints": "bitmap", "keep": "same", "part": "ricesm", "w16": "ricesm", "w32": "ricesm"}
    for threads in (1, 3):
        assert delta.same_bits(delta.apply(old, FORMAT4_FIXTURE, threads=threads), new)


def _float_pair(dtype: torch.dtype, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(old, new) of 96 x 70 elements: about `fraction` of them moved by a few ulps, in a
    tensor whose exponent classes include zero, denormals, +-inf and NaN."""
    rng = np.random.default_rng(seed)
    u = delta._UINT[torch.empty((), dtype=dtype).element_size()]
    old = torch.from_numpy(rng.standard_normal(96 * 70) * 0.05).to(dtype)
    bits = delta._raw(old).view(u).copy()
    bits[:8] = np.array([0, 1, 2, bits[3] | (u(1) << u(8 * bits.itemsize - 1)), 5, 6, 7, 8], dtype=u)
    bits[8:12] = np.array(
        [
            torch.tensor(x, dtype=dtype).view({2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.itemsize]).item()
            for x in (float("inf"), float("-inf"), float("nan"), -0.0)
        ]
    ).astype(u)
    step = rng.choice(np.array([-3, -2, -1, 1, 2, 3]), bits.size).astype(np.int64).astype(u)
    step[rng.random(bits.size) >= fraction] = 0
    return (
        torch.from_numpy(bits.copy()).view(dtype).reshape(96, 70),
        torch.from_numpy(bits + step).view(dtype).reshape(96, 70),
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.97, 1.0])
def test_every_decoding_path_is_bit_exact(path: str, dtype: torch.dtype, fraction: float) -> None:
    """`bitmap`, `rice` and `ricesm` payloads of the same change, decoded (some classes
    unchanged, some partly, some entirely changed; every element changed at 1.0)."""
    old, new = _float_pair(dtype, fraction, seed=int(fraction * 100))
    u = delta._UINT[old.element_size()]
    a, b = delta._raw(old).view(u), delta._raw(new).view(u)
    payloads, count = delta._ordered_payloads(a, b, dtype)
    assert count == int((a != b).sum())
    assert (count == a.size) == (fraction == 1.0)  # 1.0: the path where every element changed
    assert payloads["bitmap"] == delta._bitmap_payload(a, b, dtype)[0]  # the encoder's gather, by argsort
    assert np.array_equal(delta._apply_bitmap(a, payloads["bitmap"], count, dtype, "w"), b)
    assert np.array_equal(delta._apply_rice(a, payloads["rice"], count, dtype, "w", "zigzag"), b)
    assert np.array_equal(delta._apply_rice(a, payloads["ricesm"], count, dtype, "w", "signmag"), b)
    blob = delta.encode({"w": old}, {"w": new})
    assert delta.same_bits(delta.apply({"w": old}, blob), {"w": new})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_class_counts_are_the_exponent_histogram(path: str, dtype: torch.dtype) -> None:
    old, _ = _float_pair(dtype, 0.5, seed=1)
    u = delta._UINT[old.element_size()]
    a = delta._raw(old).view(u)
    counts = delta._class_counts(a, dtype)
    key = delta._class_key(a, dtype)
    assert counts.size == 1 << (8 * a.itemsize - 1 - delta._MANTISSA_BITS[dtype])
    assert np.array_equal(counts, np.bincount(key, minlength=counts.size))
    sorted_key = key[np.argsort(key, kind="stable")]
    assert np.array_equal(delta._bounds(counts), delta._classes(a[np.argsort(key, kind="stable")], dtype))
    assert sorted_key.size == counts.sum()


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4096, 4097])
def test_key_counts_count_odd_and_even_lengths(n: int) -> None:
    key = np.random.default_rng(n).integers(0, 256, n).astype(np.uint8)
    counts = delta._key_counts(key)
    assert np.array_equal(counts, np.bincount(key, minlength=counts.size))


@pytest.mark.parametrize("itemsize", [1, 2, 4, 8])
def test_unshuffle_inverts_shuffle(itemsize: int) -> None:
    raw = np.random.default_rng(itemsize).integers(0, 256, 40 * itemsize).astype(np.uint8)
    back = delta._unshuffle(delta._shuffle(raw, itemsize), itemsize)
    assert np.array_equal(back, raw)
    back[0] ^= 1  # a fresh, writable array, not a view of the payload
    assert back.flags.writeable


def _model_like(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    old: dict[str, torch.Tensor] = {}
    for i in range(9):
        old[f"l{i}.w"] = torch.randn(64, 80, generator=g) * 0.05
        old[f"l{i}.b"] = torch.randn(80, generator=g).to(torch.bfloat16)
    old["ids"] = torch.arange(100)
    new = {k: v.clone() for k, v in old.items()}
    for i in range(9):
        new[f"l{i}.w"] -= 1e-4 * torch.sign(torch.randn(64, 80, generator=g))
    new["l3.b"][5] = 1.0
    new["added"] = torch.ones(3)
    del new["ids"]
    return old, new


@pytest.mark.parametrize("threads", [1, 2, 4, 32])
def test_threads_give_the_same_weights(threads: int) -> None:
    old, new = _model_like(0)
    blob = delta.encode(old, new)
    out = delta.apply(old, blob, threads=threads)
    assert delta.same_bits(out, new)
    assert list(out) == sorted(new)
    assert delta.same_bits(out, delta.apply(old, blob, threads=1))


@pytest.mark.parametrize("threads", [1, 4])
def test_threads_still_refuse_a_corrupt_delta(threads: int) -> None:
    old, new = _model_like(1)
    blob = delta.encode(old, new, codec="zlib")
    head = delta.read_header(blob)
    last = max(head["tensors"], key=lambda e: e["offset"])
    bad = bytearray(blob)
    bad[head["_payload_start"] + last["offset"] + last["length"] // 2] ^= 0x5A  # a late tensor's payload
    with pytest.raises(delta.DeltaError):
        delta.apply(old, bytes(bad), threads=threads)
    with pytest.raises(delta.DeltaError, match="checksum"):  # decodes, but to other weights
        other = (old["l0.w"].view(torch.int32) ^ 1).view(torch.float32)  # last bit: same exponent classes
        delta.apply({**old, "l0.w": other}, blob, threads=threads, verify_base=False)


def test_a_known_base_checksum_replaces_hashing_the_base(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = _model_like(2)
    blob = delta.encode(old, new)
    base_sha = delta.read_header(blob)["base_sha256"]
    calls: list[int] = []
    original = delta.weights_sha256
    monkeypatch.setattr(delta, "weights_sha256", lambda w: calls.append(1) or original(w))
    assert delta.same_bits(delta.apply(old, blob, base_sha256=base_sha), new)
    assert calls == []
    with pytest.raises(delta.DeltaError, match="base checksum"):
        delta.apply(old, blob, base_sha256="0" * 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_signmag_differences_round_trip(path: str, dtype: torch.dtype) -> None:
    """Both decoders of `ricesm` differences: +-1, the one-byte escape (|d| - 1 >= 255),
    and |d| = 2**(bits-1), whose sign-magnitude form wraps."""
    u = delta._UINT[torch.empty((), dtype=dtype).element_size()]
    nbits = 8 * np.dtype(u).itemsize
    steps = [1, -1, 255, -255, 256, -256, 257, -70000, 2 ** (nbits - 1), 2**nbits - 1, 3]
    d = np.array([x % 2**nbits for x in steps * 40], dtype=np.uint64).astype(u)
    base = np.random.default_rng(5).integers(0, 2**nbits - 1, d.size, dtype=np.uint64, endpoint=True).astype(u)
    data = delta._signmag_values(base, base + d)
    assert np.array_equal(delta._read_signmag(data, d.size, u, "w"), d)
    itemsize = np.dtype(u).itemsize
    for bad in (data[:-1], data[:-itemsize], data + bytes(itemsize)):  # cut, one escape short, one extra
        with pytest.raises(delta.DeltaError, match=r"wrong size|too short"):
            delta._read_signmag(bad, d.size, u, "w")
