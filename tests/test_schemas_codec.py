"""The event contract: valid events round-trip, invalid input names the bad field."""

from __future__ import annotations

import base64

import orjson
import pytest

from schemas.codec import MAX_MESSAGE_BYTES, InvalidEvent, dead_letter, decode, encode, key_of
from schemas.events import FeedbackEvent, GenerationEvent, ModelUpdateEvent, SampleEvent
from schemas.topics import ALL_TOPICS, DLQ, FEEDBACK, GENERATIONS, PUBLIC_TOPICS, SAMPLES, topic_for_name
from tests.factories import feedback, generation


def test_generation_round_trips_through_json() -> None:
    event = generation()
    assert decode(GenerationEvent, encode(event)) == event


@pytest.mark.parametrize(
    ("kind", "value", "extra"),
    [
        ("thumb", -1.0, {}),
        ("rating", 4.0, {}),
        ("accept", None, {}),
        ("dwell", 12.5, {}),
        ("edit", None, {"edited_text": "Mittens.", "final": True}),
    ],
)
def test_every_feedback_kind_round_trips(kind: str, value: float | None, extra: dict) -> None:
    event = feedback(kind=kind, value=value, **extra)
    assert decode(FeedbackEvent, encode(event)) == event


def test_terminal_signals() -> None:
    assert feedback(kind="accept", value=None).is_terminal
    assert feedback(kind="edit", value=None, edited_text="x", final=True).is_terminal
    assert not feedback(kind="edit", value=None, edited_text="x").is_terminal
    assert not feedback(kind="thumb", value=1.0).is_terminal


def _raw(**overrides: object) -> bytes:
    obj = orjson.loads(encode(generation()))
    obj.update(overrides)
    return orjson.dumps({k: v for k, v in obj.items() if v is not ...})


@pytest.mark.parametrize(
    ("raw", "field", "reason_part"),
    [
        (b"{not json", None, "invalid JSON"),
        (b"\xff\xfe{}", None, "invalid JSON"),
        (b"[1, 2]", None, "expected a JSON object"),
        (b'{"a": NaN}', None, "invalid JSON"),
        (_raw(generation_id=...), "generation_id", "required"),
        (_raw(policy_version="seven"), "policy_version", "integer"),
        (_raw(policy_version=-1), "policy_version", "greater than or equal"),
        (_raw(surprise=1), "surprise", "Extra inputs"),
        (_raw(completion_logprobs=[-0.5]), "completion_logprobs", "must match"),
        (_raw(completion_logprobs=[-0.5, 0.5]), "completion_logprobs.1", "less than or equal"),
        (_raw(prompt_token_ids=[1, -3]), "prompt_token_ids.1", "greater than or equal"),
        (_raw(sampling={"top_p": 2}), "sampling.top_p", "less than or equal"),
        (_raw(user_id="a b"), "user_id", "pattern"),
        (_raw(prompt="x" * 300_000), "prompt", "at most"),
        (_raw(schema_version=2), "schema_version", "Input should be 1"),
    ],
)
def test_invalid_generation_names_the_field(raw: bytes, field: str | None, reason_part: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(GenerationEvent, raw)
    assert info.value.field == field
    assert reason_part in info.value.reason
    assert info.value.raw == raw


@pytest.mark.parametrize(
    ("obj", "field", "reason_part"),
    [
        ({"kind": "love"}, "kind", "Input should be"),
        ({"kind": "rating", "value": 9}, "value", "between 1 and 5"),
        ({"kind": "thumb", "value": 0.5}, "value", "+1 or -1"),
        ({"kind": "accept", "value": 1}, "value", "takes no value"),
        ({"kind": "edit", "value": None}, "edited_text", "required"),
        ({"kind": "dwell", "value": -3}, "value", "seconds"),
    ],
)
def test_invalid_feedback_names_the_field(obj: dict, field: str, reason_part: str) -> None:
    raw = orjson.dumps({"generation_id": "g", "user_id": "u", "value": None} | obj)
    with pytest.raises(InvalidEvent) as info:
        decode(FeedbackEvent, raw)
    assert info.value.field == field
    assert reason_part in info.value.reason


def test_oversized_message_is_rejected_unparsed() -> None:
    raw = b"{" + b" " * MAX_MESSAGE_BYTES + b"}"
    with pytest.raises(InvalidEvent, match="exceeds"):
        decode(FeedbackEvent, raw)


def test_deeply_nested_input_is_an_invalid_event() -> None:
    raw = b'{"generation_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(InvalidEvent):
        decode(FeedbackEvent, raw)


def test_delta_update_requires_its_base() -> None:
    raw = orjson.dumps(
        {
            "model": "m",
            "version": 2,
            "artifact_kind": "delta",
            "artifact_url": "m/2.delta",
            "sha256": "0" * 64,
            "size_bytes": 10,
        }
    )
    with pytest.raises(InvalidEvent) as info:
        decode(ModelUpdateEvent, raw)
    assert info.value.field == "base_version"


def test_dead_letter_keeps_original_bytes_and_is_deterministic() -> None:
    raw = b'{"generation_id": "g", "kind": "rating", "value": 9, "user_id": "u"}'
    with pytest.raises(InvalidEvent) as info:
        decode(FeedbackEvent, raw)
    a = dead_letter(info.value, source_topic="feedback.v1", rejected_by="t", key=b"g", partition=3, offset=17)
    b = dead_letter(info.value, source_topic="feedback.v1", rejected_by="t", key=b"g", partition=3, offset=17)
    assert a.event_id == b.event_id
    assert base64.b64decode(a.original_b64) == raw
    assert a.error_field == "value"
    assert key_of(a, DLQ.key) == b"g"


def test_registry_keys_exist_on_their_events_and_join_topics_are_co_partitioned() -> None:
    for topic in ALL_TOPICS:
        assert (topic.event is None) is topic.internal, topic.name
    for topic in PUBLIC_TOPICS:
        assert topic.key in topic.event.model_fields, topic.name
    assert GENERATIONS.partitions == FEEDBACK.partitions == SAMPLES.partitions
    assert topic_for_name("x.samples.v1", "x.") is SAMPLES
    assert SampleEvent is SAMPLES.event
