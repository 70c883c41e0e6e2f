"""The gateway over real HTTP (uvicorn on loopback) and a real broker."""

from __future__ import annotations

import uuid

import httpx
import orjson
import pytest

from schemas.events import DeadLetterEvent, FeedbackEvent, GenerationEvent
from tests import test_gateway_support as support
from tests.factories import generation
from tests.test_gateway_support import GatewayEnv, read_events

gateway_env = support.gateway_env

THUMB = {"generation_id": "g1", "kind": "thumb", "value": 1, "user_id": "u1"}


@pytest.fixture
def client(gateway_env: GatewayEnv):
    with httpx.Client(base_url=gateway_env.url, timeout=30) as c:
        yield c


def feedback_in(env: GatewayEnv, event_ids: set[str]) -> list[FeedbackEvent]:
    events = read_events(env.bootstrap, f"{env.prefix}feedback.v1", FeedbackEvent)
    return [e for e in events if e.event_id in event_ids]


# -- auth --------------------------------------------------------------------------------
def test_missing_key_is_401(client):
    r = client.post("/v1/feedback", json=THUMB)
    assert r.status_code == 401
    assert r.json()["error"] == {
        "message": "missing API key: send `Authorization: Bearer <key>`",
        "field": "Authorization",
        "type": "authentication_error",
    }
    assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Bearer rlf_000000000000_" + "A" * 43, "Bearer nonsense", "Basic abc"])
def test_wrong_key_is_401(client, header):
    r = client.post("/v1/feedback", json=THUMB, headers={"Authorization": header})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_tenant_comes_from_the_key_never_the_body(client, gateway_env):
    eid = f"t-{uuid.uuid4().hex}"
    # globex's key cannot write as acme ...
    r = client.post(
        "/v1/feedback", json=THUMB | {"tenant_id": "acme", "event_id": eid}, headers=gateway_env.auth("globex")
    )
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "tenant_id"
    # ... and what it writes is globex's.
    r = client.post("/v1/feedback", json=THUMB | {"event_id": eid}, headers=gateway_env.auth("globex"))
    assert r.status_code == 200
    [event] = feedback_in(gateway_env, {eid})
    assert event.tenant_id == "globex"


def test_idempotency_is_per_tenant(client, gateway_env):
    eid = f"shared-{uuid.uuid4().hex}"
    a = client.post("/v1/feedback", json=THUMB | {"event_id": eid}, headers=gateway_env.auth("acme"))
    b = client.post("/v1/feedback", json=THUMB | {"event_id": eid}, headers=gateway_env.auth("globex"))
    assert a.json()["duplicate"] is False
    assert b.json()["duplicate"] is False  # another tenant's id is no duplicate of mine
    assert sorted(e.tenant_id for e in feedback_in(gateway_env, {eid})) == ["acme", "globex"]


# -- accepted means written ---------------------------------------------------------------
def test_single_and_batch_feedback_are_written(client, gateway_env):
    one = client.post("/v1/feedback", json=THUMB | {"generation_id": "gen-a"}, headers=gateway_env.auth())
    assert one.status_code == 200, one.text
    batch = [THUMB | {"generation_id": f"gen-{i}", "kind": "rating", "value": 1 + i % 5} for i in range(20)]
    many = client.post("/v1/feedback/batch", json={"events": batch}, headers=gateway_env.auth())
    assert many.status_code == 200, many.text
    assert many.json()["accepted"] == 20
    ids = {one.json()["event_id"], *many.json()["event_ids"]}
    written = feedback_in(gateway_env, ids)
    assert {e.event_id for e in written} == ids and len(written) == 21
    assert all(e.tenant_id == "acme" for e in written)


def test_generations_are_written_with_their_key(client, gateway_env):
    gen = generation(f"gen-{uuid.uuid4().hex}").model_dump(mode="json", exclude={"tenant_id"})
    r = client.post("/v1/generations", json=gen, headers=gateway_env.auth())
    assert r.status_code == 200, r.text
    r2 = client.post(
        "/v1/generations/batch", json={"events": [gen | {"event_id": "other-1"}]}, headers=gateway_env.auth()
    )
    assert r2.status_code == 200, r2.text
    events = read_events(gateway_env.bootstrap, f"{gateway_env.prefix}generations.v1", GenerationEvent)
    mine = [e for e in events if e.generation_id == gen["generation_id"]]
    assert len(mine) == 2 and all(e.tenant_id == "acme" for e in mine)


# -- idempotent retries ---------------------------------------------------------------------
def test_retry_with_idempotency_key_is_written_once(client, gateway_env):
    key = f"idem-{uuid.uuid4().hex}"
    first = client.post("/v1/feedback", json=THUMB, headers=gateway_env.auth() | {"Idempotency-Key": key})
    again = client.post("/v1/feedback", json=THUMB, headers=gateway_env.auth() | {"Idempotency-Key": key})
    assert first.status_code == again.status_code == 200
    assert first.json() == {"event_id": key, "duplicate": False}
    assert again.json() == {"event_id": key, "duplicate": True}
    assert len(feedback_in(gateway_env, {key})) == 1


def test_batch_retry_produces_only_the_new_events(client, gateway_env):
    events = [THUMB | {"event_id": f"b-{uuid.uuid4().hex}"} for _ in range(5)]
    first = client.post("/v1/feedback/batch", json={"events": events[:3]}, headers=gateway_env.auth())
    retry = client.post("/v1/feedback/batch", json={"events": events}, headers=gateway_env.auth())
    assert first.json()["accepted"] == 3
    assert retry.json() | {"event_ids": None} == {"accepted": 2, "duplicates": 3, "event_ids": None}
    ids = {e["event_id"] for e in events}
    assert len(feedback_in(gateway_env, ids)) == 5


def test_same_id_in_one_batch_is_written_once(client, gateway_env):
    eid = f"dup-{uuid.uuid4().hex}"
    r = client.post("/v1/feedback/batch", json={"events": [THUMB | {"event_id": eid}] * 3}, headers=gateway_env.auth())
    assert r.json()["accepted"] == 1 and r.json()["duplicates"] == 2
    assert len(feedback_in(gateway_env, {eid})) == 1


def test_reusing_an_id_for_another_event_is_a_conflict(client, gateway_env):
    eid = f"c-{uuid.uuid4().hex}"
    assert client.post("/v1/feedback", json=THUMB | {"event_id": eid}, headers=gateway_env.auth()).status_code == 200
    r = client.post("/v1/feedback", json=THUMB | {"event_id": eid, "value": -1}, headers=gateway_env.auth())
    assert r.status_code == 409
    assert r.json()["error"]["field"] == "event_id"


# -- rejected input ---------------------------------------------------------------------------
def test_invalid_event_is_422_naming_the_field_and_dead_lettered(client, gateway_env):
    marker = f"bad-{uuid.uuid4().hex}"
    body = orjson.dumps(THUMB | {"value": 5, "session_id": marker})
    r = client.post("/v1/feedback", content=body, headers=gateway_env.auth() | {"Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json() == {
        "error": {"message": "value: a thumb must be +1 or -1", "field": "value", "type": "invalid_event"}
    }
    from tests.test_gateway_support import wait_for

    def dead() -> list[DeadLetterEvent]:
        letters = read_events(gateway_env.bootstrap, f"{gateway_env.prefix}dlq.v1", DeadLetterEvent)
        return [d for d in letters if marker.encode() in __import__("base64").b64decode(d.original_b64)]

    wait_for(lambda: len(dead()) == 1, 20, "the dead letter")
    [letter] = dead()
    assert letter.rejected_by == "gateway" and letter.error_field == "value"
    assert letter.tenant_id == "acme" and letter.source_topic == f"{gateway_env.prefix}feedback.v1"
    assert __import__("base64").b64decode(letter.original_b64) == body


def test_batch_with_one_bad_event_writes_nothing(client, gateway_env):
    eid = f"none-{uuid.uuid4().hex}"
    events = [THUMB | {"event_id": eid}, THUMB | {"kind": "rating", "value": 9}]
    r = client.post("/v1/feedback/batch", json={"events": events}, headers=gateway_env.auth())
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "events.1.value"
    assert feedback_in(gateway_env, {eid}) == []


def test_size_limits(client, gateway_env):
    huge = b'{"events": [' + b",".join([orjson.dumps(THUMB)] * 30_000) + b"]}"
    r = client.post("/v1/feedback/batch", content=huge, headers=gateway_env.auth())
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"

    def chunks():
        yield huge  # no Content-Length: the gateway counts while reading

    r = client.post("/v1/feedback/batch", content=chunks(), headers=gateway_env.auth())
    assert r.status_code == 413
    r = client.post("/v1/feedback/batch", json={"events": [THUMB] * 1001}, headers=gateway_env.auth())
    assert r.status_code == 413 and r.json()["error"]["field"] == "events"


def test_not_json_is_415(client, gateway_env):
    r = client.post("/v1/feedback", content=b"a=b", headers=gateway_env.auth() | {"Content-Type": "text/plain"})
    assert r.status_code == 415


# -- operations -----------------------------------------------------------------------------
def test_health_metrics_and_openapi(client):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["broker"] == "up"
    metrics = client.get("/metrics").text
    assert 'rlfeed_gateway_events_total{outcome="accepted",topic="feedback.v1"}' in metrics
    assert "rlfeed_gateway_inflight_events" in metrics
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) >= {"/v1/feedback", "/v1/feedback/batch", "/v1/generations", "/health", "/metrics"}
    assert "tenant_id" not in spec["components"]["schemas"]["FeedbackEventIn"]["properties"]
    r = client.get("/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
