"""Tenants never see or write each other's data: the dashboard's data endpoints (real
chdb, every panel query) and the gateway (real broker)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import orjson
import pytest
from fastapi.testclient import TestClient

from schemas.events import DeadLetterEvent, FeedbackEvent, GenerationEvent, SampleEvent, now_ms
from services.apikeys import KeyStore, create_key
from services.dashboard import queries
from services.dashboard.monitor import Monitor
from services.dashboard.panels import Store
from services.dashboard.server import ALL_TENANTS, Denied, build_app, viewer_of
from services.dashboard.settings import DashboardSettings
from services.sink.rows import SPECS
from tests import test_gateway_support as support
from tests.factories import feedback, generation
from tests.test_gateway_support import GatewayEnv, read_events, wait_for

gateway_env = support.gateway_env

# tenant -> (policy version, rows, reward, accept or reject, feedback kind, latency ms, dead letters)
SEED = {"acme": (1, 3, 1.0, "accept", "thumb", 100.0, 1), "globex": (2, 5, -1.0, "reject", "rating", 900.0, 2)}


def _insert(client, topic: str, events: list) -> None:
    spec = SPECS[topic]
    rows = [spec.as_dict(e) for e in events]
    client.insert(spec.table, [list(r.values()) for r in rows], column_names=list(rows[0]))


def seed(client) -> None:
    t = now_ms() - 5_000
    for tenant, (version, n, reward, verdict, kind, latency, letters) in SEED.items():
        gens = [
            generation(f"{tenant}-g{i}", tenant_id=tenant, policy_version=version, latency_ms=latency, event_time_ms=t)
            for i in range(n)
        ]
        _insert(client, "generations.v1", gens)
        value = 1.0 if kind == "thumb" else 4.0
        _insert(
            client,
            "feedback.v1",
            [feedback(g.generation_id, kind=kind, value=value, tenant_id=tenant, event_time_ms=t) for g in gens],
        )
        samples = [
            SampleEvent(
                tenant_id=tenant,
                event_time_ms=t,
                generation_id=g.generation_id,
                model="m",
                policy_version=version,
                prompt="p",
                completion="c",
                prompt_token_ids=[1],
                completion_token_ids=[2],
                completion_logprobs=[-0.1],
                reward=reward,
                reward_components={verdict: reward},
                feedback_event_ids=["f"],
                settle_reason="terminal",
                user_id="u",
                generated_at_ms=t,
            )
            for g in gens
        ]
        _insert(client, "samples.v1", samples)
        dead = [
            DeadLetterEvent(
                tenant_id=tenant,
                event_time_ms=t,
                source_topic="feedback.v1",
                original_b64=base64.b64encode(b"{}").decode(),
                error_field=f"{tenant}_field",
                reason="bad",
                rejected_by="gateway",
            )
            for _ in range(letters)
        ]
        _insert(client, "dlq.v1", dead)


@pytest.fixture
def dash(clickhouse, tmp_path) -> Iterator[dict]:
    seed(clickhouse)
    clickhouse.insert(
        "alerts",
        [[datetime.now(UTC), "consumer_lag", "rlfeed-sink", "firing", "warning", "lag", 1.0, 0.0, ""]],
        column_names=["ts", "rule", "key", "status", "severity", "message", "value", "threshold", "details"],
    )
    keys_file = tmp_path / "keys.json"
    keys = {t: create_key(keys_file, t) for t in ("acme", "globex", "operator")}
    settings = DashboardSettings(dashboard_port=0)
    store = Store(clickhouse)
    app = build_app(store, Monitor(store, settings), settings, KeyStore(keys_file))
    with TestClient(app) as client:
        yield {"client": client, "keys": keys, "db": clickhouse}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def panels_of(dash: dict, tenant: str) -> dict:
    r = dash["client"].get("/api/panels", headers=auth(dash["keys"][tenant]))
    assert r.status_code == 200, r.text
    return r.json()["panels"]


def series_names(panel: dict) -> set[str]:
    return {s["name"] for s in panel["series"]}


def total(panel: dict) -> float:
    return sum(p[1] for s in panel["series"] for p in s["points"])


@pytest.mark.parametrize("tenant", ["acme", "globex"])
def test_a_tenant_key_sees_only_its_rows(dash: dict, tenant: str) -> None:
    version, n, reward, verdict, kind, latency, letters = SEED[tenant]
    p = panels_of(dash, tenant)
    assert all(panel["error"] is None for panel in p.values()), {k: v["error"] for k, v in p.items()}
    assert set(p) == set(queries.TENANT_BY_NAME)  # no infrastructure panel
    assert series_names(p["reward_by_version"]) == {f"v{version}"}
    assert [pt[1] for pt in p["reward_by_version"]["series"][0]["points"]] == [reward]
    [accept] = p["accept_rate_by_version"]["points"]
    assert (accept["x"], accept["n"], accept["accepts"]) == (version, n, n if verdict == "accept" else 0)
    assert series_names(p["feedback_mix"]) == {kind} and total(p["feedback_mix"]) == n
    assert round(total(p["throughput"]) * 60) == 2 * n  # n samples + n generations
    assert {pt[1] for s in p["latency"]["series"] for pt in s["points"]} == {latency}
    assert [pt[0] for s in p["completion_by_version"]["series"] for pt in s["points"]] == [version] * 3
    assert total(p["dead_letters"]) == letters
    assert series_names(p["dead_letters"]) == {f"feedback.v1: {tenant}_field"}


def test_the_operator_sees_every_tenant_and_the_infrastructure(dash: dict) -> None:
    p = panels_of(dash, "operator")
    assert set(queries.OPERATOR_ONLY) <= set(p)
    assert series_names(p["feedback_mix"]) == {"thumb", "rating"}
    assert series_names(p["reward_by_version"]) == {"v1", "v2"}
    alerts = dash["client"].get("/api/alerts", headers=auth(dash["keys"]["operator"]))
    assert alerts.status_code == 200 and [a["rule"] for a in alerts.json()["recent"]] == ["consumer_lag"]


def test_keys_are_required_once_configured(dash: dict) -> None:
    c = dash["client"]
    assert c.get("/api/panels").status_code == 401
    assert c.get("/api/panels", headers=auth("rlf_000000000000_" + "A" * 43)).status_code == 401
    assert c.get("/api/panels", headers={"X-API-Key": dash["keys"]["acme"]}).status_code == 200
    alerts = c.get("/api/alerts", headers=auth(dash["keys"]["acme"]))
    assert alerts.status_code == 200 and alerts.json()["recent"] == [] and alerts.json()["firing"] == []
    assert c.post("/api/forget", json={"user_id": "u"}, headers=auth(dash["keys"]["acme"])).status_code == 403
    assert c.get("/health").status_code == 200 and c.get("/").status_code == 200


def test_operator_forget_deletes_one_tenants_user(dash: dict) -> None:
    r = dash["client"].post(
        "/api/forget", json={"tenant_id": "acme", "user_id": "user-1"}, headers=auth(dash["keys"]["operator"])
    )
    assert r.status_code == 200, r.text
    assert r.json()["deleted"]["generations"] == 3
    left = dash["db"].query("SELECT tenant_id, count() FROM generations GROUP BY tenant_id").result_rows
    assert dict(left) == {"globex": 5}


def test_every_tenant_query_filters_by_tenant() -> None:
    for q in queries.TENANT_PANELS:
        froms = q.sql.count("FROM samples") + q.sql.count("FROM feedback") + q.sql.count("FROM generations")
        froms += q.sql.count("FROM dead_letters")
        assert froms >= 1 and q.sql.count("tenant_id = {tenant:String}") == froms, q.name


def test_viewer_of(tmp_path) -> None:
    path = tmp_path / "keys.json"
    store = KeyStore(path)
    assert viewer_of(store, None, "operator") is ALL_TENANTS  # no key on file: open
    key = create_key(path, "acme")
    op = create_key(path, "ops")
    assert viewer_of(store, key, "ops") == "acme"  # the new file is picked up
    assert viewer_of(store, op, "ops") is ALL_TENANTS
    with pytest.raises(Denied):
        viewer_of(store, None, "ops")


# -- the gateway ----------------------------------------------------------------------------
def test_gateway_batch_claiming_another_tenant_writes_nothing(gateway_env: GatewayEnv) -> None:
    ids = [f"tb-{uuid.uuid4().hex}" for _ in range(2)]
    body = {
        "events": [
            {"generation_id": "g1", "kind": "accept", "user_id": "u1", "event_id": ids[0]},
            {"generation_id": "g1", "kind": "accept", "user_id": "u1", "event_id": ids[1], "tenant_id": "globex"},
        ]
    }
    with httpx.Client(base_url=gateway_env.url, timeout=30) as c:
        r = c.post("/v1/feedback/batch", json=body, headers=gateway_env.auth("acme"))
        assert r.status_code == 422 and r.json()["error"]["field"] == "events.1.tenant_id"
        gen = generation(f"gen-{uuid.uuid4().hex}").model_dump(mode="json") | {"tenant_id": "globex"}
        r = c.post("/v1/generations", json=gen, headers=gateway_env.auth("acme"))
        assert r.status_code == 422 and r.json()["error"]["field"] == "tenant_id"
        # a control: the same batch without the claim is written, as acme's
        del body["events"][1]["tenant_id"]
        assert c.post("/v1/feedback/batch", json=body, headers=gateway_env.auth("acme")).status_code == 200
    written = [
        e
        for e in read_events(gateway_env.bootstrap, f"{gateway_env.prefix}feedback.v1", FeedbackEvent)
        if e.event_id in ids
    ]
    assert sorted(e.event_id for e in written) == sorted(ids) and {e.tenant_id for e in written} == {"acme"}
    gens = read_events(gateway_env.bootstrap, f"{gateway_env.prefix}generations.v1", GenerationEvent)
    assert not [g for g in gens if g.generation_id == gen["generation_id"]]

    def letters() -> list[DeadLetterEvent]:
        out = read_events(gateway_env.bootstrap, f"{gateway_env.prefix}dlq.v1", DeadLetterEvent)
        return [d for d in out if ids[1].encode() in base64.b64decode(d.original_b64)]

    wait_for(lambda: len(letters()) >= 1, 20, "the dead letter")
    assert {d.tenant_id for d in letters()} == {"acme"}  # filed under the key's tenant, not the claimed one
    assert orjson.loads(base64.b64decode(letters()[0].original_b64))["tenant_id"] == "globex"
