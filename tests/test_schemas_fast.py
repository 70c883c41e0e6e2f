"""The fast decoders (schemas/fast.py, msgspec structs derived from the pydantic models)
against the contract, both directions:

- generations and feedback (the join's inputs): the same verdict and the same error on
  valid input, on input broken field by field, and on arbitrary bytes; the strict fast
  path alone never accepts what pydantic refuses, and accepts every valid event as the
  codec encodes it;
- every public topic (the sink): what the fast decoder accepts the model accepts, with
  the same values and the same ClickHouse row; every event the model accepts, as the
  codec encodes it, takes the fast path.
(The join-specific property, the same samples from both paths, is in
tests/test_streams_join.py.)"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from typing import Any

import msgspec
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import fast
from schemas.codec import InvalidEvent, decode, encode
from schemas.events import (
    MAX_SAFE_INT,
    MAX_TIME_MS,
    DeadLetterEvent,
    Event,
    FeedbackEvent,
    ForgetEvent,
    GenerationEvent,
    ModelUpdateEvent,
    PreferenceEvent,
    ReplicaStatusEvent,
    RolloutEvent,
    SampleEvent,
    SamplingParams,
)
from schemas.fast import DecodeError, _charset_check, _with_plain_enums, fast_decoder
from schemas.topics import PUBLIC_TOPICS
from services.sink.rows import SPECS
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
    st.sampled_from(
        [
            0,
            1,
            -1,
            2**31,
            2**31 - 1,
            2**53 - 1,
            2**53,
            2**63,
            2**64,
            MAX_TIME_MS,
            MAX_TIME_MS + 1,
            10**14,
            1.0,
            -1.0,
            0.5,
            86_400,
            86_400.5,
            1e4,
            -1e4,
        ]
    ),
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
        "event_time_ms": st.integers(0, MAX_TIME_MS),
        "tenant_id": ids,
        "sampling": st.fixed_dictionaries(
            {},
            optional={
                "temperature": st.floats(0.0, 10.0),
                "top_p": st.floats(0.0, 1.0, exclude_min=True),
                "max_tokens": st.integers(1, 32_768),
                "seed": st.one_of(st.none(), st.integers(-MAX_SAFE_INT, MAX_SAFE_INT)),
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
        "event_time_ms": st.integers(0, MAX_TIME_MS),
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


T0 = 1_700_000_000_000


def _examples() -> dict[str, list[Event]]:
    """Valid events of every public topic, with optional fields both set and left out."""
    sample = {
        "generation_id": "g-1",
        "model": "m",
        "policy_version": 2,
        "prompt": "p",
        "completion": "some words",
        "prompt_token_ids": [1, 2],
        "completion_token_ids": [3, 4, 5],
        "completion_logprobs": [-0.1, -2.5, 0.0],
        "reward": 0.5,
        "reward_components": {"thumb": 1.0, "dwell": -0.25},
        "feedback_event_ids": ["fb-1", "fb:2"],
        "settle_reason": "window",
        "user_id": "u-1",
        "generated_at_ms": T0,
    }
    return {
        "generations.v1": [
            generation("g-1"),
            generation(
                "g-2",
                session_id="s-1",
                replica_id="r-0",
                latency_ms=12.5,
                finish_reason="length",
                sampling={"temperature": 0.7, "top_p": 0.9, "max_tokens": 64, "seed": 3},
                tenant_id="acme",
                event_time_ms=T0,
            ),
        ],
        "feedback.v1": [
            feedback("g-1", kind="thumb", value=-1.0),
            feedback("g-1", kind="rating", value=4.0, session_id="s"),
            feedback("g-1", kind="accept", value=None),
            feedback("g-1", kind="dwell", value=12.5),
            feedback("g-1", kind="edit", value=None, edited_text="better", final=True),
        ],
        "samples.v1": [
            SampleEvent(**sample),
            SampleEvent(**sample | {"settle_reason": "correction", "corrects_event_id": "e1", "first_feedback_ms": T0}),
        ],
        "model-updates.v1": [
            ModelUpdateEvent(
                model="m", version=1, artifact_kind="full", artifact_url="m/v1", sha256="0" * 64, size_bytes=10
            ),
            ModelUpdateEvent(
                model="m",
                version=2,
                parent_version=1,
                artifact_kind="delta",
                base_version=1,
                artifact_url="m/v2.delta",
                sha256="ab" * 32,
                weights_sha256="cd" * 32,
                size_bytes=0,
                eval_metrics={"reward": 0.4, "kl": 0.01},
                rollback=True,
            ),
        ],
        "replica-status.v1": [
            ReplicaStatusEvent(replica_id="r-0", model="m", version=1, state="serving", engine="vllm"),
            ReplicaStatusEvent(
                replica_id="r-1",
                model="m",
                version=0,
                state="error",
                engine="transformers",
                url="http://127.0.0.1:8101",
                error="out of memory",
                requests_total=7,
                events_dropped={"buffer_full": 3, "error": 1},
            ),
        ],
        "dlq.v1": [
            DeadLetterEvent(source_topic="feedback.v1", original_b64="e30=", reason="bad", rejected_by="gateway"),
            DeadLetterEvent(
                source_topic="feedback.v1",
                source_partition=3,
                source_offset=17,
                key_b64="Zw==",
                original_b64="e30=",
                error_field="value",
                reason="value: a rating must be between 1 and 5",
                rejected_by="streams",
            ),
        ],
        "rollouts.v1": [
            RolloutEvent(model="m", stable_version=1, decision="collect"),
            RolloutEvent(
                model="m",
                stable_version=1,
                candidate_version=2,
                candidate_traffic=0.25,
                decision="promote",
                reason="better",
                arms={"a": 1.0},
            ),
        ],
        "preferences.v1": [
            PreferenceEvent(
                generation_id="g-1", kind="edit", model="m", prompt="p", chosen="a", rejected="b", user_id="u"
            ),
            PreferenceEvent(
                generation_id="g-1",
                kind="unpaired",
                model="m",
                prompt="p",
                rejected="b",
                margin=0.5,
                feedback_event_ids=["f1"],
                user_id="u",
            ),
        ],
        "forget-requests.v1": [ForgetEvent.for_user("acme", "u-1", requested_by="ticket 12")],
    }


EXAMPLES = _examples()
MODELS = {t.name: t.event for t in PUBLIC_TOPICS}
DECODERS = {name: fast_decoder(model) for name, model in MODELS.items()}


def _reference(name: str, raw: bytes) -> tuple | None:
    """The row `codec.decode` (the model) gives for `raw`; None when it rejects it."""
    try:
        return SPECS[name].row(decode(MODELS[name], raw))
    except InvalidEvent:
        return None


def _fast(name: str, raw: bytes) -> tuple | None:
    try:
        return SPECS[name].row(DECODERS[name](raw))
    except DecodeError:
        return None


def test_every_public_topic_has_a_fast_decoder_and_examples() -> None:
    # A topic whose model cannot be translated would silently fall back to pydantic
    # (several times slower); one without examples here would go untested.
    assert {t.name for t in PUBLIC_TOPICS} <= set(EXAMPLES) & set(SPECS)
    assert all(DECODERS[name] is not None for name in MODELS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_valid_events_decode_to_the_same_rows(name: str) -> None:
    for ev in EXAMPLES[name]:
        raw = encode(ev)
        assert _fast(name, raw) == SPECS[name].row(ev) == _reference(name, raw)
        # Defaults written out explicitly decode the same way too.
        full = orjson.dumps(ev.model_dump(mode="json"))
        assert _fast(name, full) == SPECS[name].row(ev)


CASES: list[tuple[str, dict[str, Any]]] = [
    ("feedback.v1", {"value": 7.0, "kind": "rating"}),  # the model's validator
    ("feedback.v1", {"value": 3.0}),  # a thumb of 3
    ("feedback.v1", {"kind": "accept", "value": 1.0}),
    ("feedback.v1", {"kind": "nope"}),
    ("feedback.v1", {"user_id": "has space"}),
    ("feedback.v1", {"user_id": "trailing\n"}),  # `$` must not match before a final newline
    ("feedback.v1", {"user_id": "é"}),
    ("feedback.v1", {"user_id": ""}),
    ("feedback.v1", {"user_id": "x" * 129}),
    ("feedback.v1", {"user_id": None}),
    ("feedback.v1", {"surprise": 1}),  # extra="forbid"
    ("feedback.v1", {"schema_version": 2}),
    ("feedback.v1", {"event_time_ms": -1}),
    ("feedback.v1", {"event_time_ms": MAX_TIME_MS + 1}),  # ClickHouse TTLs wrap after 2106
    ("feedback.v1", {"value": 1e400}),  # inf through JSON
    ("generations.v1", {"completion_logprobs": [-0.5]}),  # length must match the token ids
    ("generations.v1", {"completion_logprobs": [-0.5, 0.5]}),  # a logprob above 0
    ("generations.v1", {"prompt_token_ids": [1, -2]}),
    ("generations.v1", {"prompt_token_ids": [2**31]}),
    ("generations.v1", {"prompt_token_ids": [1.5]}),
    ("generations.v1", {"sampling": {"top_p": 0}}),
    ("generations.v1", {"sampling": {"temperature": 1, "extra": 1}}),
    ("generations.v1", {"policy_version": -1}),
    ("generations.v1", {"latency_ms": -1}),
    ("generations.v1", {"finish_reason": None}),
    ("generations.v1", {"prompt": "x" * 200_001}),
    ("samples.v1", {"reward_components": {"k" * 129: 1.0}}),
    ("samples.v1", {"feedback_event_ids": ["ok", "not ok"]}),
    ("samples.v1", {"reward": 1001}),
    ("model-updates.v1", {"artifact_kind": "delta", "base_version": None}),
    ("model-updates.v1", {"sha256": "A" * 64}),
    ("model-updates.v1", {"sha256": "a" * 64 + "\n"}),
    ("replica-status.v1", {"engine": "llama"}),
    ("rollouts.v1", {"candidate_traffic": 1.5}),
    ("preferences.v1", {"rejected": None}),
    ("preferences.v1", {"margin": 0}),
    ("forget-requests.v1", {"event_id": "0" * 32}),  # must be derived from tenant and user
]


@pytest.mark.parametrize(("name", "change"), CASES)
def test_invalid_events_are_refused_by_both(name: str, change: dict[str, Any]) -> None:
    raw = json.dumps(json.loads(encode(EXAMPLES[name][0])) | change).encode()
    assert _reference(name, raw) is None, "the case should be invalid under the contract"
    assert _fast(name, raw) is None


@pytest.mark.parametrize(
    ("name", "change"),
    [("generations.v1", {"policy_version": "3"}), ("feedback.v1", {"final": 0}), ("generations.v1", {"latency_ms": 5})],
)
def test_the_fast_decoder_may_be_stricter_never_more_lenient(name: str, change: dict[str, Any]) -> None:
    # pydantic's lax mode accepts "3" for an int; msgspec does not, so such a message
    # takes the slow path (and lands); an int for a float is fine in both.
    raw = json.dumps(json.loads(encode(EXAMPLES[name][0])) | change).encode()
    ref = _reference(name, raw)
    assert ref is not None
    assert _fast(name, raw) in (None, ref)


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1, 2]", b'{"a": ', b"\xff\xfe", b"null", b"[" * 10_000])
def test_garbage_is_refused_without_raising_anything_else(payload: bytes) -> None:
    for name in MODELS:
        assert _fast(name, payload) is None


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["", "a b", "ok-id", "x\n", "é", "terminal", "thumb", "rating", "delta", "vllm", "0" * 64]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid example with one field (top-level, or inside a list or object) changed,
    removed, or added."""
    name = draw(st.sampled_from(sorted(EXAMPLES)))
    doc = json.loads(encode(draw(st.sampled_from(EXAMPLES[name]))))
    model = MODELS[name]
    key = draw(st.sampled_from(sorted(model.model_fields)))
    action = draw(st.sampled_from(["set", "set", "set", "inner", "drop", "add"]))
    if action == "drop":
        if model.model_fields[key].default_factory is None:  # a factory (random ids) differs per decode
            doc.pop(key, None)
    elif action == "add":
        doc[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
    elif action == "inner" and isinstance(doc.get(key), list) and doc[key]:
        doc[key][draw(st.integers(0, len(doc[key]) - 1))] = draw(JSON_VALUES)
    elif action == "inner" and isinstance(doc.get(key), dict) and doc[key]:
        doc[key][draw(st.sampled_from(sorted(doc[key])))] = draw(JSON_VALUES)
    else:
        doc[key] = draw(JSON_VALUES)
    return name, json.dumps(doc).encode()


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_what_the_fast_decoder_accepts_the_model_accepts_with_the_same_row(case: tuple[str, bytes]) -> None:
    name, raw = case
    got = _fast(name, raw)
    if got is not None:
        assert got == _reference(name, raw)
        assert msgspec.to_builtins(DECODERS[name](raw)) == decode(MODELS[name], raw).model_dump(mode="json")


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_what_the_model_accepts_takes_the_fast_path_once_encoded(case: tuple[str, bytes]) -> None:
    # The other direction, for every topic: an event the model accepts (lax input
    # included), as the codec writes it, is accepted by the fast decoder, same values.
    name, raw = case
    try:
        event = decode(MODELS[name], raw)
    except InvalidEvent:
        return
    encoded = encode(event)
    assert _fast(name, encoded) == SPECS[name].row(event)
    assert msgspec.to_builtins(DECODERS[name](encoded)) == event.model_dump(mode="json")


def test_properties_of_the_models_read_the_same_on_the_structs() -> None:
    for name, events in EXAMPLES.items():
        for event in events:
            struct = DECODERS[name](encode(event))
            for attr, value in vars(type(event)).items():
                if isinstance(value, property):
                    assert getattr(struct, attr) == getattr(event, attr), (name, attr)


def test_charset_check_joins_fields_and_names_the_bad_one() -> None:
    check = _charset_check("A-Za-z0-9_-", ["a", "b", "c"])

    class Row:
        def __init__(self, a: object, b: object, c: object) -> None:
            self.a, self.b, self.c = a, b, c

    check(Row("x", None, ["y", "z-1"]))
    check(Row("x", "y", []))
    for bad, field in ((Row("x", "y\nz", []), "b"), (Row("x", None, ["ok", "ü"]), "c"), (Row("a.b", "y", []), "a")):
        with pytest.raises(ValueError, match=f"^{field}: "):
            check(bad)


def test_validators_run_with_enum_members_as_plain_strings() -> None:
    check = _with_plain_enums(FeedbackEvent.__pydantic_decorators__.model_validators["_value_fits_kind"].func)

    class Fb:
        kind, value, edited_text, final = "thumb", 2.0, None, False

    with pytest.raises(ValueError, match="thumb"):
        check(Fb())
    Fb.value = 1.0
    check(Fb())


def test_a_model_the_translation_does_not_know_gets_no_fast_decoder() -> None:
    from pydantic import field_validator

    class WithFieldValidator(Event):
        name: str

        @field_validator("name")
        @classmethod
        def _strip(cls, v: str) -> str:
            return v.strip()

    assert fast_decoder(WithFieldValidator) is None
    with pytest.raises(DecodeError):
        fast._RefuseAll().decode(b"{}")


# --- the join's generations: arrays kept as their bytes (fast.GENERATION_SPLICE_DECODER) ---


def splice_agrees(raw: bytes) -> None:
    """The spliced decoder accepts exactly what the fast decoder accepts, with the same
    values; its arrays are `JsonArray`s equal to the lists, whose bytes parse to them."""
    try:
        want = fast.GENERATION_DECODER.decode(raw)
    except DecodeError:
        want = None
    try:
        got = fast.GENERATION_SPLICE_DECODER.decode(raw)
    except DecodeError:
        got = None
    assert (got is None) == (want is None), raw
    if got is None:
        return
    for name in fast.FastGeneration.__struct_fields__:
        a, b = getattr(got, name), getattr(want, name)
        if name in ("prompt_token_ids", "completion_token_ids", "completion_logprobs"):
            assert isinstance(a, fast.JsonArray) and a == b and b == a and len(a) == len(b), name
            assert [type(x) for x in a] == [type(x) for x in b], name
            assert orjson.loads(orjson.dumps(a.fragment())) == b, name
        elif name not in ("event_id", "event_time_ms") or f'"{name}"'.encode() in raw:
            assert a == b, name  # (the two default factories give fresh values on each side)


@SETTINGS
@given(generation_dicts())
def test_spliced_generations_agree_with_the_fast_decoder(obj: dict) -> None:
    raw = dumps(obj)  # json.dumps: arrays with spaces after the commas
    splice_agrees(raw)
    splice_agrees(encode(GenerationEvent.model_validate_json(raw)))
    assert fast.GENERATION_SPLICE_DECODER.decode(raw) is not None


@SETTINGS
@given(st.one_of(broken(generation_dicts(), GEN_FIELDS), st.builds(dict, json_junk=json_junk)))
def test_broken_generations_are_refused_by_the_spliced_decoder_as_by_the_fast_one(obj: dict) -> None:
    splice_agrees(dumps(obj))


@pytest.mark.parametrize(
    "arrays",
    [
        b'"completion_token_ids":[3,4],"completion_logprobs":[-0.5]',  # lengths differ (the validator)
        b'"completion_token_ids":[3,-4],"completion_logprobs":[-0.5,-1]',  # a negative token id
        b'"completion_token_ids":[3,2147483648],"completion_logprobs":[-0.5,-1]',  # >= 2**31
        b'"completion_token_ids":[3,4.0],"completion_logprobs":[-0.5,-1]',  # a float token id
        b'"completion_token_ids":[3,4],"completion_logprobs":[-0.5,0.5]',  # a logprob > 0
        b'"completion_token_ids":[3,4],"completion_logprobs":[-0.5,"x"]',
        b'"completion_token_ids":{"a":1},"completion_logprobs":[-0.5,-1]',
        b'"completion_token_ids":[3,4],"completion_logprobs":[-0.5,-1e400]',
    ],
)
def test_the_spliced_decoder_checks_every_array_item(arrays: bytes) -> None:
    raw = encode(generation())
    start = raw.index(b'"completion_token_ids"')
    end = raw.index(b"]", raw.index(b'"completion_logprobs"')) + 1
    bad = raw[:start] + arrays + raw[end:]
    splice_agrees(bad)
    with pytest.raises(DecodeError):
        fast.GENERATION_SPLICE_DECODER.decode(bad)
    if b"4.0" in arrays:  # pydantic's lax mode takes an integral float as an int
        assert fast.decode_generation(bad).completion_token_ids == [3, 4]
        return
    with pytest.raises(InvalidEvent):
        fast.decode_generation(bad)


def test_json_array_reads_like_the_list() -> None:
    raw = b'{"generation_id":"g","model":"m","policy_version":1,"prompt":"p","completion":"c",'
    raw += b'"prompt_token_ids":[ 1 , 2 ],"completion_token_ids":[7],"completion_logprobs":[-1],"user_id":"u"}'
    g = fast.GENERATION_SPLICE_DECODER.decode(raw)
    arr = g.completion_logprobs
    assert len(arr) == 1 and arr[0] == -1.0 and type(arr[0]) is float and list(arr) == [-1.0] and arr == [-1.0]
    assert g.prompt_token_ids == [1, 2] and bytes(g.prompt_token_ids.raw) == b"[ 1 , 2 ]"
    assert orjson.dumps({"x": g.prompt_token_ids.fragment()}) == b'{"x":[ 1 , 2 ]}'
    assert g.prompt_token_ids != [1, 3] and g.prompt_token_ids != "[1,2]"
