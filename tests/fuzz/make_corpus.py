"""The hand-written hostile inputs, one message value / request body each, that no entrance
may accept as a generation or a feedback event. The tests take them from `cases()`;
`python -m tests.fuzz.make_corpus [DIR]` writes them as files (default tests/fuzz/corpus/,
git-ignored) to replay by hand, e.g. `kcat -P -b 127.0.0.1:19092 -t feedback.v1 FILE`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

CORPUS_DIR = Path(__file__).parent / "corpus"

FEEDBACK = {"event_id": "fz-e", "generation_id": "fz-g", "kind": "rating", "value": 4, "user_id": "fz-u"}


def _fb(**over: object) -> bytes:
    return orjson.dumps({**FEEDBACK, **over})


def _replace(raw: bytes, old: bytes, new: bytes) -> bytes:
    assert old in raw
    return raw.replace(old, new, 1)


def cases() -> dict[str, bytes]:
    base = _fb()
    return {
        # encoding
        "utf8_invalid_in_string.json": _replace(base, b"fz-u", b"fz-\xff\xfe"),
        "utf8_invalid_bare.bin": b"\xff\xfe\xfd\x80\x81",
        "utf8_overlong_slash.json": _replace(base, b"fz-u", b"fz\xc0\xafu"),
        "utf16_bom.json": b"\xff\xfe" + base.decode().encode("utf-16-le"),
        "lone_surrogate_escape.json": _replace(base, b"fz-u", b"fz\\ud800u"),
        "nul_in_id.json": _replace(base, b"fz-u", b"fz\\u0000u"),
        "empty.bin": b"",
        "whitespace.json": b" \n\t ",
        # shape
        "not_object_array.json": b"[]",
        "not_object_string.json": b'"feedback"',
        "not_object_null.json": b"null",
        "not_object_number.json": b"42",
        "truncated.json": base[: len(base) // 2],
        "trailing_garbage.json": base + b"}}garbage",
        "two_objects.json": base + base,
        "comment.json": b"/* hi */" + base,
        "single_quotes.json": base.replace(b'"', b"'"),
        # nesting
        "deep_array_100k.json": b"[" * 100_000 + b"]" * 100_000,
        "deep_object_5k.json": b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
        "deep_in_unknown_field.json": _replace(base, b"{", b'{"x":' + b"[" * 3_000 + b"]" * 3_000 + b","),
        "deep_in_value.json": _fb(value=None).replace(b"null", b"[" * 3_000 + b"]" * 3_000),
        "deep_unclosed.json": b"[" * 900_000,
        # numbers
        "nan_literal.json": _replace(base, b'"value":4', b'"value":NaN'),
        "infinity_literal.json": _replace(base, b'"value":4', b'"value":Infinity'),
        "neg_infinity_literal.json": _replace(base, b'"value":4', b'"value":-Infinity'),
        "float_overflow.json": _replace(base, b'"value":4', b'"value":1e999'),
        "huge_integer.json": _replace(base, b'"value":4', b'"value":' + b"9" * 5_000),
        "rating_out_of_range.json": _fb(value=9),
        "thumb_zero.json": _fb(kind="thumb", value=0),
        "dwell_negative.json": _fb(kind="dwell", value=-1),
        "dwell_nan_string.json": _fb(kind="dwell", value="NaN"),
        # wrong types
        "value_string.json": _fb(value="four"),
        "kind_number.json": _fb(kind=5),
        "kind_unknown.json": _fb(kind="smile"),
        "user_id_number.json": _fb(user_id=123),
        "user_id_object.json": _fb(user_id={"$ne": None}),
        "final_string.json": _fb(kind="edit", edited_text="x", value=None, final="maybe"),
        "event_time_string.json": _fb(event_time_ms="yesterday"),
        "event_time_negative.json": _fb(event_time_ms=-5),
        "event_time_float.json": _fb(event_time_ms=1.5),
        "generation_id_list.json": _fb(generation_id=["a", "b"]),
        "missing_generation_id.json": orjson.dumps({k: v for k, v in FEEDBACK.items() if k != "generation_id"}),
        "missing_everything.json": b"{}",
        # ids that are not ids
        "id_path_traversal.json": _fb(generation_id="..\\..\\etc\\passwd"),
        "id_sql.json": _fb(user_id="u'; DROP TABLE feedback; --"),
        "id_newline.json": _fb(user_id="u\nINJECTED"),
        "id_too_long.json": _fb(generation_id="g" * 129),
        "id_empty.json": _fb(user_id=""),
        "id_unicode.json": _fb(user_id="\u202eadmin"),
        # unknown fields and spoofing
        "unknown_field.json": _fb(admin=True),
        "unknown_field_proto.json": _replace(base, b"{", b'{"__proto__":{"admin":true},'),
        "duplicate_key_bad_last.json": _replace(base, b'"value":4', b'"value":4,"value":"x"'),
        # huge strings and arrays (below the 1 MiB message limit)
        "huge_string_300k.json": _fb(kind="edit", edited_text="x" * 300_000, value=None, final=True),
        "huge_unknown_array.json": _replace(base, b"{", b'{"pad":[' + b",".join([b"1"] * 200_000) + b"],"),
        "huge_generation_tokens.json": orjson.dumps(
            {
                "event_id": "fz-gen",
                "generation_id": "fz-g",
                "model": "m",
                "policy_version": 0,
                "prompt": "p",
                "completion": "c",
                "prompt_token_ids": [1] * 40_000,
                "completion_token_ids": [1],
                "completion_logprobs": [-0.5],
                "user_id": "u",
            }
        ),
        "generation_logprob_positive.json": orjson.dumps(
            {
                "event_id": "fz-gen2",
                "generation_id": "fz-g",
                "model": "m",
                "policy_version": 0,
                "prompt": "p",
                "completion": "c",
                "prompt_token_ids": [1],
                "completion_token_ids": [1],
                "completion_logprobs": [3.0],
                "user_id": "u",
                "kind": "accept",
            }
        ),
    }


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else CORPUS_DIR
    out.mkdir(exist_ok=True)
    for name, data in cases().items():
        (out / name).write_bytes(data)
    print(f"{len(cases())} files in {out}")


if __name__ == "__main__":
    main()
