"""Hostile HTTP input against a running gateway (real uvicorn, real broker).

Every hand-written corpus input, to every ingest endpoint, is answered 4xx (never 5xx),
and each single-event 422 is dead-lettered on dlq.v1 with the reason and the original
bytes. Generated JSON bodies never get a 5xx, and what is accepted is a valid event.
Replayed event ids are produced once; forged tenants, keys and ids are refused.
"""

from __future__ import annotations

import base64
import uuid
from collections import Counter

import httpx
import orjson
import pytest
from hypothesis import given

from schemas.codec import MAX_DEAD_LETTER_ORIGINAL_BYTES, decode
from schemas.events import DeadLetterEvent, FeedbackEvent
from schemas.topics import DLQ, FEEDBACK, GENERATIONS
from tests import test_gateway_support as support
from tests.fuzz.corpus_files import corpus, fuzz_settings
from tests.fuzz.test_fuzz_codec import feedback_like, json_values
from tests.test_gateway_support import GatewayEnv, read_events, read_topic

gateway_env = support.gateway_env
ENDPOINTS = ["/v1/feedback", "/v1/generations", "/v1/feedback/batch", "/v1/generations/batch"]


def _post(env: GatewayEnv, path: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{env.url}{path}",
        content=body,
        headers={**env.auth(), "Content-Type": "application/json", **headers},
        timeout=60,
    )


def _letters(env: GatewayEnv) -> list[DeadLetterEvent]:
    return read_events(env.bootstrap, DLQ.full_name(env.prefix), DeadLetterEvent)


def test_corpus_is_refused_without_server_errors_and_dead_lettered(gateway_env: GatewayEnv) -> None:
    before = len(_letters(gateway_env))
    statuses: Counter[int] = Counter()
    refused_single: list[bytes] = []
    for path in ENDPOINTS:
        for name, raw in corpus():
            r = _post(gateway_env, path, raw)
            statuses[r.status_code] += 1
            assert 400 <= r.status_code < 500, (path, name, r.status_code, r.text[:300])
            err = r.json()["error"]
            assert err["message"] and err["type"], (path, name)
            if r.status_code == 422 and not path.endswith("/batch"):
                refused_single.append(raw)
    print("gateway corpus statuses", dict(statuses), "inputs", sum(statuses.values()))
    assert statuses[422] > 0
    support.wait_for(lambda: len(_letters(gateway_env)) - before >= len(refused_single), what="dead letters")
    letters = [d for d in _letters(gateway_env)[before:] if d.rejected_by == "gateway"]
    originals = Counter(base64.b64decode(d.original_b64) for d in letters)
    for raw in refused_single:
        if len(raw) > MAX_DEAD_LETTER_ORIGINAL_BYTES:  # cut to fit the broker, and said so
            cut = raw[:MAX_DEAD_LETTER_ORIGINAL_BYTES]
            assert any(base64.b64decode(d.original_b64) == cut and "truncated" in d.reason for d in letters)
        else:
            assert originals[raw] >= 1, f"no dead letter with the original bytes of {raw[:80]!r}"
    assert all(d.reason and d.tenant_id == "acme" for d in letters)
    health = httpx.get(f"{gateway_env.url}/health", timeout=10)
    assert health.status_code == 200


@given(obj=json_values | feedback_like)
def test_generated_bodies_never_get_a_server_error(gateway_env: GatewayEnv, obj) -> None:
    raw = orjson.dumps(obj)
    for path in ("/v1/feedback", "/v1/generations"):
        r = _post(gateway_env, path, raw)
        assert r.status_code < 500, (path, raw[:300], r.text[:300])
        if r.status_code == 200:
            model = FEEDBACK.event if path == "/v1/feedback" else GENERATIONS.event
            fields = {**obj, "tenant_id": "acme", "event_id": r.json()["event_id"]}
            decode(model, orjson.dumps(fields))


test_generated_bodies_never_get_a_server_error = fuzz_settings()(test_generated_bodies_never_get_a_server_error)


def _feedback(**over: object) -> bytes:
    return orjson.dumps({"generation_id": "g-replay", "kind": "accept", "user_id": "u-1", **over})


def _feedback_ids(env: GatewayEnv) -> Counter[str]:
    msgs = read_topic(env.bootstrap, FEEDBACK.full_name(env.prefix))
    return Counter(decode(FeedbackEvent, v).event_id for _, v in msgs)


def test_replayed_event_ids_are_produced_once(gateway_env: GatewayEnv) -> None:
    eid = f"replay-{uuid.uuid4().hex[:8]}"
    body = _feedback(event_id=eid)
    answers = [_post(gateway_env, "/v1/feedback", body) for _ in range(5)]
    assert [a.status_code for a in answers] == [200] * 5
    assert [a.json()["duplicate"] for a in answers] == [False, True, True, True, True]
    batch = orjson.dumps({"events": [orjson.loads(body)] * 3})
    again = _post(gateway_env, "/v1/feedback/batch", batch)
    assert again.status_code == 200 and again.json()["accepted"] == 0, again.text
    hdr = f"replay-h-{uuid.uuid4().hex[:8]}"
    for _ in range(3):
        assert _post(gateway_env, "/v1/feedback", _feedback(), **{"Idempotency-Key": hdr}).status_code == 200
    ids = _feedback_ids(gateway_env)
    assert ids[eid] == 1 and ids[hdr] == 1


def test_replay_with_another_body_is_a_conflict(gateway_env: GatewayEnv) -> None:
    eid = f"conflict-{uuid.uuid4().hex[:8]}"
    assert _post(gateway_env, "/v1/feedback", _feedback(event_id=eid)).status_code == 200
    r = _post(gateway_env, "/v1/feedback", _feedback(event_id=eid, kind="reject"))
    assert r.status_code == 409 and r.json()["error"]["field"] == "event_id"
    assert _feedback_ids(gateway_env)[eid] == 1


@pytest.mark.parametrize(
    ("headers", "body", "status", "field"),
    [
        ({"Authorization": "Bearer not-a-key"}, _feedback(), 401, "Authorization"),
        ({"Authorization": "Basic YWRtaW46YWRtaW4="}, _feedback(), 401, "Authorization"),
        ({"Authorization": ""}, _feedback(), 401, "Authorization"),
        ({}, _feedback(tenant_id="globex"), 422, "tenant_id"),
        ({"Idempotency-Key": "../../x y"}, _feedback(), 422, "Idempotency-Key"),
        ({"Idempotency-Key": "k" * 129}, _feedback(), 422, "Idempotency-Key"),
        ({"Idempotency-Key": "key-a"}, _feedback(event_id="key-b"), 422, "event_id"),
        ({"Content-Type": "text/plain"}, _feedback(), 415, "Content-Type"),
    ],
    ids=[
        "unknown-key",
        "basic-auth",
        "empty-auth",
        "other-tenant",
        "bad-idem-key",
        "long-idem-key",
        "idem-mismatch",
        "ctype",
    ],
)
def test_forged_requests_are_refused(gateway_env: GatewayEnv, headers, body, status, field) -> None:
    marker = f"forged-{uuid.uuid4().hex[:8]}"
    body = orjson.dumps({**orjson.loads(body), "user_id": marker})
    r = _post(gateway_env, "/v1/feedback", body, **headers)
    assert r.status_code == status, r.text
    assert r.json()["error"]["field"] == field
    produced = read_topic(gateway_env.bootstrap, FEEDBACK.full_name(gateway_env.prefix))
    assert not any(marker.encode() in v for _, v in produced)


def test_oversized_body_is_refused_before_parsing(gateway_env: GatewayEnv) -> None:
    big = b'{"generation_id":"' + b"g" * 2_000_000 + b'"}'
    r = _post(gateway_env, "/v1/feedback", big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
