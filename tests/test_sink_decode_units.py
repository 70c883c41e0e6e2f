"""The sink's decoder (`schemas.fast.counted_decoder`: token id arrays counted on their
bytes, never decoded) against the contract, both directions, and the sink's GC pause.

The counted decoder may refuse valid input (whitespace inside an id array, an id of 10
digits): the sink then asks the reference decoder, so such input still lands, slower.
It must never accept what the model refuses, nor give another row."""

from __future__ import annotations

import gc
import threading

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.codec import InvalidEvent, decode, encode
from schemas.events import MAX_TOKENS, GenerationEvent, SampleEvent
from schemas.fast import COUNTED_MAX_DIGITS, CountedArray, DecodeError, counted_batch_decoder, counted_decoder
from schemas.topics import PUBLIC_TOPICS
from services.sink import worker
from services.sink.rows import SPECS
from tests.factories import generation
from tests.test_schemas_fast import EXAMPLES, MODELS, _mutated, _reference
from tests.test_sink_poll_units import PREFIX, _Msg, _sink

COUNTED = {name: counted_decoder(model) for name, model in MODELS.items()}
BATCH = {name: counted_batch_decoder(model) for name, model in MODELS.items()}


def _counted(name: str, raw: bytes) -> tuple | None:
    try:
        return SPECS[name].row(COUNTED[name](raw))
    except DecodeError:
        return None


def _has_long_id(event: object) -> bool:
    """Whether an event holds a token id the byte check leaves to the exact path."""
    ids = [*getattr(event, "prompt_token_ids", ()), *getattr(event, "completion_token_ids", ())]
    return any(i >= 10**COUNTED_MAX_DIGITS for i in ids)


def test_every_public_topic_has_a_counted_decoder() -> None:
    assert all(COUNTED[t.name] is not None and BATCH[t.name] is not None for t in PUBLIC_TOPICS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_mutated(), min_size=1, max_size=12))
def test_the_batch_decoder_gives_each_value_the_counted_decoders_verdict(cases: list[tuple[str, bytes]]) -> None:
    by_topic: dict[str, list[bytes]] = {}
    for name, raw in cases:
        by_topic.setdefault(name, []).append(raw)
    for name, values in by_topic.items():
        valid = [encode(ev) for ev in EXAMPLES[name]]
        batch = [*valid, *values, *valid]  # the refused ones among accepted ones
        got = [None if s is None else SPECS[name].row(s) for s in BATCH[name](batch)]
        assert got == [_counted(name, raw) for raw in batch]


def test_one_bad_id_in_a_batch_refuses_only_its_message() -> None:
    good = [encode(generation(f"g-{i}")) for i in range(3)]
    bad = encode(generation("g-x")).replace(b'"user_id":"', b'"user_id":"has space ', 1)
    assert _reference("generations.v1", bad) is None
    out = BATCH["generations.v1"]([good[0], bad, good[1], good[2]])
    assert [s is None for s in out] == [False, True, False, False]
    assert [SPECS["generations.v1"].row(s) for s in (out[0], out[2], out[3])] == [
        _reference("generations.v1", raw) for raw in good
    ]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_valid_events_decode_to_the_model_rows(name: str) -> None:
    for ev in EXAMPLES[name]:
        assert _counted(name, encode(ev)) == SPECS[name].row(ev) == _reference(name, encode(ev))
        assert _counted(name, orjson.dumps(ev.model_dump(mode="json"))) == SPECS[name].row(ev)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_what_the_counted_decoder_accepts_the_model_accepts_with_the_same_row(case: tuple[str, bytes]) -> None:
    name, raw = case
    got = _counted(name, raw)
    if got is not None:
        assert got == _reference(name, raw)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_mutated())
def test_what_the_model_accepts_takes_the_counted_path_once_encoded(case: tuple[str, bytes]) -> None:
    name, raw = case
    try:
        event = decode(MODELS[name], raw)
    except InvalidEvent:
        return
    got = _counted(name, encode(event))
    assert got == SPECS[name].row(event) or (got is None and _has_long_id(event))


def _gen_doc(**changes: object) -> dict:
    return orjson.loads(encode(generation("g-1"))) | changes


@pytest.mark.parametrize(
    ("ids", "accepted"),
    [
        ("[]", True),
        ("[0]", True),
        ("[7,123456789]", True),
        ("[ 1,2]", False),  # valid JSON, refused by the byte check: the exact path decides
        ("[1234567890]", False),  # 10 digits: valid up to 2**31 - 1, left to the exact path
        ("[2147483648]", False),  # out of range
        ("[-1]", False),
        ("[1.0]", False),
        ("[1e3]", False),
        ("[[1]]", False),
        ('["1"]', False),
        ("[true]", False),
        ("null", False),
        ('"[1]"', False),
        ("{}", False),
    ],
)
def test_the_byte_check_of_token_ids(ids: str, accepted: bool) -> None:
    doc = _gen_doc()
    raw = orjson.dumps(doc).replace(orjson.dumps(doc["prompt_token_ids"]), ids.encode(), 1)
    if accepted:
        struct = COUNTED["generations.v1"](raw)
        assert isinstance(struct.prompt_token_ids, CountedArray)
        assert list(struct.prompt_token_ids) == orjson.loads(ids)
        assert len(struct.prompt_token_ids) == len(orjson.loads(ids))
        assert _counted("generations.v1", raw) == _reference("generations.v1", raw)
    else:
        with pytest.raises(DecodeError):
            COUNTED["generations.v1"](raw)


def test_the_length_bounds_and_the_models_validator_see_the_counts() -> None:
    too_many = orjson.dumps(_gen_doc(prompt_token_ids=[1] * (MAX_TOKENS + 1)))
    with pytest.raises(DecodeError):
        COUNTED["generations.v1"](too_many)
    assert _reference("generations.v1", too_many) is None
    # completion_logprobs must match completion_token_ids in length (the model's validator)
    mismatch = orjson.dumps(_gen_doc(completion_token_ids=[1, 2, 3]))
    with pytest.raises(DecodeError):
        COUNTED["generations.v1"](mismatch)
    assert _reference("generations.v1", mismatch) is None


def test_a_bad_id_in_a_list_of_ids_is_refused() -> None:
    sample = EXAMPLES["samples.v1"][0]
    assert isinstance(sample, SampleEvent)
    doc = orjson.loads(encode(sample)) | {"feedback_event_ids": ["ok-1", "not ok"]}
    with pytest.raises(DecodeError):
        COUNTED["samples.v1"](orjson.dumps(doc))
    assert _reference("samples.v1", orjson.dumps(doc)) is None


def test_the_sink_lands_what_only_the_exact_path_accepts_and_dead_letters_the_rest() -> None:
    gens = f"{PREFIX}generations.v1"
    good = generation("g-1")
    spaced = encode(good).replace(b'"prompt_token_ids":[', b'"prompt_token_ids":[ ', 1)
    long_id = orjson.dumps(_gen_doc(prompt_token_ids=[2**31 - 1]))
    too_big = orjson.dumps(_gen_doc(prompt_token_ids=[2**31]))
    sink, producer = _sink([[_Msg(gens, encode(good), 0, 1), _Msg(gens, spaced, 0, 2), _Msg(gens, long_id, 0, 3)]])
    batch = sink._poll()
    assert batch is not None and batch.count == 3
    expected = SPECS["generations.v1"].row(decode(GenerationEvent, long_id))
    assert batch.rows["generations"] == [SPECS["generations.v1"].row(good)] * 2 + [expected]
    assert sink.stats.slow_path == 2 and not producer.produced

    sink, producer = _sink([[_Msg(gens, too_big, 0, 4)]])
    batch = sink._poll()
    assert batch is not None and batch.count == 1 and not batch.rows["generations"]
    ((_, value, _),) = producer.produced
    assert orjson.loads(value)["error_field"].startswith("prompt_token_ids")


def test_gc_paused_nests_across_threads_and_restores_the_collector() -> None:
    assert gc.isenabled()
    inner_entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with worker.gc_paused():
            inner_entered.set()
            release.wait(10)

    with worker.gc_paused():
        assert not gc.isenabled()
        other = threading.Thread(target=hold)
        other.start()
        assert inner_entered.wait(10)
    assert not gc.isenabled()  # the other thread still holds it
    release.set()
    other.join(10)
    assert gc.isenabled()


def test_gc_paused_leaves_a_collector_that_was_off_off() -> None:
    gc.disable()
    try:
        with worker.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
