"""The fast decoder of generations and feedback (schemas/fast.py) against the pydantic
contract: the same verdict and the same error on valid input, on input broken field by
field, and on arbitrary bytes; the strict fast path alone never accepts what pydantic
refuses, and accepts every valid event as the codec encodes it."""

from __future__ import annotations

import json
import math
from enum import StrEnum

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import fast
from schemas.codec import InvalidEvent, decode, encode
from schemas.events import FeedbackEvent, GenerationEvent, SamplingParams
from tests.factories import feedback, generation

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ID_CHARS = "abcXYZ019._:@/+=-"
ids = st.text(ID_CHARS, min_size=1, max_size=12)
bad_ids = st.sampled_from(["", "a b", "a\n", "é", "x" * 129, "a\x00", 'a"b', "\n"])
texts = st.text(max_size=40)
token_ids = st.lists(st.integers(0, 2**31 - 1), max_size=6)
json_junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1, -1, 2**31, 2**31 - 1, 10**14, 10**14 + 1, 1.0, -1.0, 0.5, 86_400, 86_400.5, 1e4, -1e4]),
    st.text(max_size=8),
    st.sampled_from(["1", "1.5", "true", "stop", "thumb", "length", "edit"]),
    st.lists(st.integers(-3, 3), max_size=3),
    st.lists(st.floats(-2e4, 1, allow_nan=False), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2),
)


@st.composite
def generation_dicts(draw: st.DrawFn) -> dict:
    n = draw(st.integers(0, 5))
    obj = {
        "generation_id": draw(ids),
        "model": draw(ids),
        "policy_version": draw(st.integers(0, 2**40)),
        "prompt": draw(texts),
        "completion": draw(texts),
        "prompt_token_ids": draw(token_ids),
        "completion_token_ids": draw(st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n)),
        "completion_logprobs": draw(st.lists(st.floats(-1e4, 0.0), min_size=n, max_size=n)),
        "user_id": draw(ids),
    }
    optional = {
        "schema_version": st.just(1),
        "event_id": ids,
        "event_time_ms": st.integers(0, 10**14),
        "tenant_id": ids,
        "sampling": st.fixed_dictionaries(
            {},
            optional={
                "temperature": st.floats(0.0, 10.0),
                "top_p": st.floats(0.0, 1.0, exclude_min=True),
                "max_tokens": st.integers(1, 32_768),
                "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
            },
        ),
        "finish_reason": st.sampled_from(["stop", "length"]),
        "session_id": st.one_of(st.none(), ids),
        "replica_id": st.one_of(st.none(), ids),
        "latency_ms": st.one_of(st.none(), st.floats(0.0, 1e8)),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            obj[name] = draw(strategy)
    return obj


@st.composite
def feedback_dicts(draw: st.DrawFn) -> dict:
    kind = draw(st.sampled_from(["thumb", "rating", "accept", "reject", "edit", "copy", "regenerate", "dwell"]))
    obj = {"generation_id": draw(ids), "kind": kind, "user_id": draw(ids)}
    value = {
        "thumb": st.sampled_from([1, -1, 1.0, -1.0]),
        "rating": st.one_of(st.integers(1, 5), st.floats(1.0, 5.0)),
        "dwell": st.floats(0.0, 86_400.0),
    }.get(kind)
    if value is not None:
        obj["value"] = draw(value)
    elif draw(st.booleans()):
        obj["value"] = None
    if kind == "edit":
        obj["edited_text"] = draw(texts)
        if draw(st.booleans()):
            obj["final"] = draw(st.booleans())
    optional = {
        "schema_version": st.just(1),
        "event_id": ids,
        "event_time_ms": st.integers(0, 10**14),
        "tenant_id": ids,
        "session_id": st.one_of(st.none(), ids),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            obj[name] = draw(strategy)
    return obj


@st.composite
def broken(draw: st.DrawFn, valid: st.SearchStrategy[dict], fields: list[str]) -> dict:
    """A valid event with one or two fields broken: replaced by junk or a bad id, deleted,
    or an unknown field added (junk is sometimes valid too; the verdicts must still agree)."""
    obj = draw(valid)
    for _ in range(draw(st.integers(1, 2))):
        how = draw(st.sampled_from(["junk", "junk", "bad_id", "delete", "extra", "nested"]))
        name = draw(st.sampled_from(fields))
        if how == "junk":
            obj[name] = draw(json_junk)
        elif how == "bad_id":
            obj[name] = draw(bad_ids)
        elif how == "delete":
            obj.pop(name, None)
        elif how == "extra":
            obj[draw(st.sampled_from(["surprise", "Kind", "value2", "seed"]))] = draw(json_junk)
        elif name in obj and isinstance(obj[name], list):
            obj[name] = [*obj[name], draw(json_junk)]
        else:
            obj["sampling"] = {
                draw(st.sampled_from(["temperature", "top_p", "max_tokens", "seed", "x"])): draw(json_junk)
            }
    return obj


def dumps(obj: object) -> bytes:
    """JSON bytes, integers beyond 64 bits included (orjson refuses them)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode()


GEN_FIELDS = [*GenerationEvent.model_fields]
FB_FIELDS = [*FeedbackEvent.model_fields]


def pydantic_verdict(model: type, raw: bytes):
    """What the join's pydantic path did before the fast path: JSON mode, else codec.decode."""
    try:
        return model.model_validate_json(raw)
    except Exception:
        return decode(model, raw)


def same_values(fast_event: msgspec.Struct, model_event: object, given_fields: set[str]) -> None:
    for name in type(model_event).model_fields:
        a, b = getattr(fast_event, name), getattr(model_event, name)
        if name in ("event_id", "event_time_ms") and name not in given_fields:
            continue  # default factories: a fresh id / the current time on each side
        if isinstance(b, StrEnum):
            b = b.value  # a pydantic default stays the enum member (a str all the same)
        if isinstance(a, StrEnum):
            a = a.value
        if isinstance(b, SamplingParams):
            b = b.model_dump()
            a = a.model_dump() if isinstance(a, SamplingParams) else msgspec.structs.asdict(a)
        assert a == b and type(a) is type(b), (name, a, b)
        if isinstance(a, float):
            assert math.copysign(1, a) == math.copysign(1, b), name


def check_agreement(model: type, raw: bytes, given_fields: set[str]) -> None:
    strict = (fast.fast_generation if model is GenerationEvent else fast.fast_feedback)(raw)
    ours = fast.decode_generation if model is GenerationEvent else fast.decode_feedback
    try:
        expected = pydantic_verdict(model, raw)
    except InvalidEvent as err:
        # refused by the contract: the fast path refuses too, with the same error
        assert strict is None, f"fast path accepted what pydantic refuses: {err}"
        with pytest.raises(InvalidEvent) as info:
            ours(raw)
        assert (info.value.field, info.value.reason, info.value.raw) == (err.field, err.reason, err.raw)
        return
    got = ours(raw)
    same_values(got, expected, given_fields)
    if strict is not None:
        same_values(strict, expected, given_fields)


@SETTINGS
@given(generation_dicts())
def test_valid_generations_take_the_fast_path_with_the_same_values(obj: dict) -> None:
    raw = dumps(obj)
    check_agreement(GenerationEvent, raw, set(obj))
    assert fast.fast_generation(raw) is not None
    assert fast.fast_generation(encode(GenerationEvent.model_validate_json(raw))) is not None


@SETTINGS
@given(feedback_dicts())
def test_valid_feedback_takes_the_fast_path_with_the_same_values(obj: dict) -> None:
    raw = dumps(obj)
    check_agreement(FeedbackEvent, raw, set(obj))
    assert fast.fast_feedback(raw) is not None
    assert fast.fast_feedback(encode(FeedbackEvent.model_validate_json(raw))) is not None


@SETTINGS
@given(broken(generation_dicts(), GEN_FIELDS))
def test_broken_generations_get_the_pydantic_verdict(obj: dict) -> None:
    check_agreement(GenerationEvent, dumps(obj), set(obj))


@SETTINGS
@given(broken(feedback_dicts(), [*FB_FIELDS, "value", "value", "edited_text", "final"]))
def test_broken_feedback_gets_the_pydantic_verdict(obj: dict) -> None:
    check_agreement(FeedbackEvent, dumps(obj), set(obj))


@SETTINGS
@given(
    st.one_of(
        st.binary(max_size=64),
        st.builds(dumps, json_junk),
        st.sampled_from(
            [
                b"",
                b"{",
                b"null",
                b"[]",
                b'{"a": NaN}',
                b'{"generation_id": "g\\ud800", "kind": "copy", "user_id": "u"}',
                b'{"generation_id": "g", "kind": "copy", "user_id": "u", "user_id": "v"}',
                b'{"generation_id": "g", "kind": "copy", "user_id": 5, "user_id": "v"}',
                b'\xef\xbb\xbf{"generation_id": "g", "kind": "copy", "user_id": "u"}',
                b'{"generation_id": "g", "kind": "rating", "value": 1e400, "user_id": "u"}',
                b'{"generation_id": "g", "kind": "thumb", "value": true, "user_id": "u"}',
                b'{"generation_id": "g", "kind": "rating", "value": "4", "user_id": "u"}',
                b'{"generation_id": "g", "kind": "copy", "user_id": "u", "event_time_ms": 5.0}',
                b'{"generation_id": "g", "kind": "edit", "edited_text": "x", "final": 1, "user_id": "u"}',
            ]
        ),
    )
)
def test_arbitrary_bytes_get_the_same_verdict(raw: bytes) -> None:
    check_agreement(FeedbackEvent, raw, set())
    check_agreement(GenerationEvent, raw, set())


def test_the_mirrors_have_the_models_fields_and_defaults() -> None:
    for struct, model in (
        (fast.FastGeneration, GenerationEvent),
        (fast.FastFeedback, FeedbackEvent),
        (fast.FastSamplingParams, SamplingParams),
    ):
        assert set(struct.__struct_fields__) == set(model.model_fields), model.__name__
    # only the required fields given: every default must come out the same
    gen = {k: v for k, v in orjson.loads(encode(generation())).items() if GenerationEvent.model_fields[k].is_required()}
    check_agreement(GenerationEvent, orjson.dumps(gen), set())
    assert fast.fast_generation(orjson.dumps(gen)) is not None
    fb = {"generation_id": "g", "kind": "copy", "user_id": "u"}
    check_agreement(FeedbackEvent, orjson.dumps(fb), set())
    assert fast.fast_feedback(orjson.dumps(fb)) is not None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (encode(generation()).replace(b'"user_id":"user-1"', b'"user_id":"user-1\\n"'), "user_id"),
        (encode(generation()).replace(b"[-0.5,-1.25]", b"[-0.5]"), "completion_logprobs"),
        (orjson.dumps({"generation_id": "g", "kind": "thumb", "value": 0.5, "user_id": "u"}), "value"),
        (orjson.dumps({"generation_id": "g", "kind": "copy", "edited_text": "x", "user_id": "u"}), "edited_text"),
    ],
)
def test_refused_input_names_the_field_as_the_codec_does(raw: bytes, field: str) -> None:
    model = FeedbackEvent if b'"kind"' in raw else GenerationEvent
    ours = fast.decode_feedback if model is FeedbackEvent else fast.decode_generation
    with pytest.raises(InvalidEvent) as info:
        ours(raw)
    assert info.value.field == field
    with pytest.raises(InvalidEvent) as expected:
        decode(model, raw)
    assert str(info.value) == str(expected.value)


def test_lax_input_is_accepted_through_pydantic() -> None:
    raw = orjson.dumps({"generation_id": "g", "kind": "rating", "value": "4", "user_id": "u"})
    assert fast.fast_feedback(raw) is None
    event = fast.decode_feedback(raw)
    assert isinstance(event, FeedbackEvent) and event.value == 4.0 and not event.is_terminal


def test_fast_events_behave_like_the_models() -> None:
    for event in (feedback(kind="accept", value=None), feedback(kind="edit", value=None, edited_text="x", final=True)):
        decoded = fast.decode_feedback(encode(event))
        assert isinstance(decoded, fast.FastFeedback) and decoded.is_terminal == event.is_terminal is True
    assert not fast.decode_feedback(encode(feedback(kind="thumb", value=-1.0))).is_terminal
    gen = generation()
    assert fast.decode_generation(encode(gen)).completion_logprobs == gen.completion_logprobs
