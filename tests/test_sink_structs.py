"""The sink's fast decoders (services/sink/structs.py) against the contract's models.

The property that matters: a message the fast decoder accepts is one `codec.decode`
accepts too, and it maps to the same ClickHouse row. (The fast decoder may refuse more:
those messages take the slow path and are still decided by the model.)
"""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import InvalidEvent, decode, encode
from schemas.events import (
    DeadLetterEvent,
    Event,
    FeedbackEvent,
    ForgetEvent,
    ModelUpdateEvent,
    PreferenceEvent,
    ReplicaStatusEvent,
    RolloutEvent,
    SampleEvent,
)
from schemas.topics import PUBLIC_TOPICS
from services.sink.rows import SPECS
from services.sink.structs import DecodeError, _charset_check, _with_plain_enums, fast_decoder
from tests.factories import feedback, generation

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
    ("feedback.v1", {"event_time_ms": 10**14 + 1}),
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
    fast = _fast(name, raw)
    if fast is not None:
        assert fast == _reference(name, raw)


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
