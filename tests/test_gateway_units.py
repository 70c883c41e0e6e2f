"""Pure parts of the gateway: API keys, the idempotency cache, request validation, settings."""

from __future__ import annotations

import os
import stat

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.codec import InvalidEvent
from schemas.events import FeedbackEvent, GenerationEvent
from services import apikeys as keys
from services.cli import main
from services.gateway.idempotency import Entry, IdempotencyCache
from services.gateway.settings import GatewaySettings
from services.gateway.validation import ApiError, check_idempotency_key, digest_of, parse_batch, parse_single

THUMB = {"generation_id": "g1", "kind": "thumb", "value": 1, "user_id": "u1"}


# -- keys -------------------------------------------------------------------------------
def test_key_roundtrip_and_hashed_storage(tmp_path):
    path = tmp_path / "keys.json"
    key_a = keys.create_key(path, "acme")
    key_b = keys.create_key(path, "globex")
    store = keys.KeyStore(path)
    assert store.tenant_of(key_a) == "acme"
    assert store.tenant_of(key_b) == "globex"
    text = path.read_text()
    assert key_a not in text and key_a.split("_")[-1] not in text  # only the salted hash is stored
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("bad", ["", "nope", "rlf_000000000000_" + "A" * 43, "Bearer x"])
def test_wrong_keys_are_refused(tmp_path, bad):
    path = tmp_path / "keys.json"
    key = keys.create_key(path, "acme")
    store = keys.KeyStore(path)
    assert store.tenant_of(bad) is None
    key_id, secret = keys.parse_key(key)
    tampered = f"rlf_{key_id}_{'B' if secret[0] != 'B' else 'C'}{secret[1:]}"
    assert store.tenant_of(tampered) is None


def test_key_store_sees_keys_created_after_start(tmp_path):
    path = tmp_path / "keys.json"
    store = keys.KeyStore(path)
    assert len(store) == 0
    key = keys.create_key(path, "late")
    assert store.tenant_of(key) == "late"


def test_tenant_name_is_checked():
    with pytest.raises(ValueError, match="tenant"):
        keys.new_key("no spaces please")


def test_create_key_cli_prints_the_key_once(tmp_path, monkeypatch, capsys):
    path = tmp_path / "k.json"
    monkeypatch.setenv("RLFEED_KEYS_FILE", str(path))
    assert main(["keys", "create", "--tenant", "acme"]) == 0  # `rlfeed keys create`
    out = capsys.readouterr()
    key = out.out.strip()
    assert keys.KeyStore(path).tenant_of(key) == "acme"
    assert key not in out.err
    assert main(["keys", "create", "--tenant", "bad tenant"]) == 2
    assert len(keys.load_records(path)) == 1


# -- idempotency cache -------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_cache_forgets_after_the_window():
    clock = Clock()
    cache = IdempotencyCache(window_s=10, max_entries=100, clock=clock)
    cache.put("a", Entry(b"x", accepted=True))
    clock.t = 9.9
    assert cache.get("a") is not None
    clock.t = 10.0
    assert cache.get("a") is None
    assert len(cache) == 0


def test_cache_is_bounded_oldest_first():
    cache = IdempotencyCache(window_s=100, max_entries=3, clock=Clock())
    for k in "abcd":
        cache.put(k, Entry(b""))
    assert cache.get("a") is None
    assert all(cache.get(k) is not None for k in "bcd")
    assert cache.evicted == 1


def test_cache_discard_only_the_given_entry():
    cache = IdempotencyCache(window_s=100, max_entries=3, clock=Clock())
    old, new = Entry(b"1"), Entry(b"2")
    cache.put("k", old)
    cache.put("k", new)
    cache.discard("k", old)
    assert cache.get("k") is new
    cache.discard("k", new)
    assert cache.get("k") is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.floats(0, 5)), max_size=60), st.integers(1, 8))
def test_cache_never_exceeds_its_bound_nor_returns_expired(ops, bound):
    clock = Clock()
    cache = IdempotencyCache(window_s=3, max_entries=bound, clock=clock)
    put_at: dict[int, float] = {}
    for key, dt in ops:
        clock.t += dt
        cache.put(key, Entry(b""))
        put_at[key] = clock.t
        assert len(cache) <= bound
        for k, t in put_at.items():
            if cache.get(k) is not None:
                assert clock.t - t < 3


# -- validation --------------------------------------------------------------------------
def test_single_event_gets_tenant_and_idempotency_key():
    parsed = parse_single(FeedbackEvent, orjson.dumps(THUMB), "acme", "req-1")
    assert parsed.event.tenant_id == "acme"
    assert parsed.event.event_id == "req-1"


def test_tenant_in_body_must_match_the_key():
    assert parse_single(FeedbackEvent, orjson.dumps(THUMB | {"tenant_id": "acme"}), "acme", None)
    with pytest.raises(InvalidEvent) as err:
        parse_single(FeedbackEvent, orjson.dumps(THUMB | {"tenant_id": "globex"}), "acme", None)
    assert err.value.field == "tenant_id"


def test_event_id_must_agree_with_the_header():
    with pytest.raises(InvalidEvent) as err:
        parse_single(FeedbackEvent, orjson.dumps(THUMB | {"event_id": "a"}), "acme", "b")
    assert err.value.field == "event_id"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (THUMB | {"value": 3}, "value"),
        (THUMB | {"kind": "love"}, "kind"),
        (THUMB | {"colour": "red"}, "colour"),
        ({k: v for k, v in THUMB.items() if k != "user_id"}, "user_id"),
        (THUMB | {"generation_id": "has space"}, "generation_id"),
        ([1, 2], None),
    ],
)
def test_errors_name_the_field_like_the_codec(body, field):
    raw = orjson.dumps(body)
    with pytest.raises(InvalidEvent) as err:
        parse_single(FeedbackEvent, raw, "acme", None)
    assert err.value.field == field
    assert err.value.raw == raw


def test_invalid_json_is_an_invalid_event():
    with pytest.raises(InvalidEvent, match="invalid JSON"):
        parse_single(FeedbackEvent, b"{nope", "acme", None)


def test_batch_errors_name_the_event_and_keep_its_bytes():
    good = THUMB | {"event_id": "e0"}
    bad = THUMB | {"value": 7}
    with pytest.raises(ApiError) as err:
        parse_batch(FeedbackEvent, orjson.dumps({"events": [good, bad, bad]}), "acme", 10)
    assert err.value.status == 422
    assert err.value.field == "events.1.value"
    assert [orjson.loads(e.raw) for e in err.value.invalid] == [bad, bad]
    assert err.value.body()["error"]["field"] == "events.1.value"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"events": "x"}, 422, "events"),
        ({}, 422, "events"),
        ({"events": [], "extra": 1}, 422, "extra"),
        ({"events": [THUMB] * 11}, 413, "events"),
        ({"events": [3]}, 422, "events.0"),
    ],
)
def test_batch_shape_errors(body, status, field):
    with pytest.raises(ApiError) as err:
        parse_batch(FeedbackEvent, orjson.dumps(body), "acme", 10)
    assert (err.value.status, err.value.field) == (status, field)


def test_generation_batch_validates_with_the_codec_message():
    from tests.factories import generation

    gen = generation().model_dump(mode="json", exclude={"tenant_id"})
    gen["completion_logprobs"] = [-0.1]
    with pytest.raises(ApiError) as err:
        parse_batch(GenerationEvent, orjson.dumps({"events": [gen]}), "acme", 10)
    assert err.value.field == "events.0.completion_logprobs"


def test_digest_ignores_key_order():
    assert digest_of({"a": 1, "b": 2}) == digest_of({"b": 2, "a": 1})
    assert digest_of({"a": 1}) != digest_of({"a": 2})
    assert digest_of({"a": 1, "event_time_ms": 1}) == digest_of({"a": 1, "event_time_ms": 2})


@pytest.mark.parametrize("value", ["", "x" * 129, "has space", "é"])
def test_bad_idempotency_keys(value):
    with pytest.raises(ApiError) as err:
        check_idempotency_key(value)
    assert err.value.field == "Idempotency-Key"


def test_settings_validate_and_default_keys_file(tmp_path):
    s = GatewaySettings(home_dir=tmp_path)
    assert s.resolved_keys_file == tmp_path / "gateway-keys.json"
    with pytest.raises(ValueError, match="max_inflight_events"):
        GatewaySettings(max_inflight_events=10, max_batch_events=100)
