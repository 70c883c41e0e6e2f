"""`rlfeed forget USER_ID [--tenant T]`: stop training on a user, then delete their rows.

Order, and why:
  1. Produce a ForgetEvent to forget-requests.v1 (acks=all). From then on the stream
     worker drops the user's samples (streams/forget.py), so nothing the user does later
     is trained on. It goes first so that no sample settles between the delete and the
     filter.
  2. Delete the user's rows from ClickHouse (services/privacy/forget.py):
     - `RLFEED_CLICKHOUSE_URL` set: straight through clickhouse-connect (http or chdb);
     - else, with the embedded stack running (it owns the chdb directory): through the
       stack's dashboard, `POST /api/forget` (an operator key from
       `RLFEED_FORGET_OPERATOR_KEY` when API keys are configured);
     - else: the embedded chdb directory, opened here.
Rows of the user that reach ClickHouse after step 2 (events already on their way, or new
ones from the app) are not deleted by it: the sink copies every event. Run the command
again once the sink has caught up (`rlfeed status`); it is idempotent (the ForgetEvent
has a deterministic id, deletes of nothing are no-ops).

Prints one JSON object: the tenant, the user, the forget event id and the rows deleted per table.
"""

from __future__ import annotations

import sys

import orjson
from pydantic import SecretStr

from services.privacy.settings import PrivacySettings


class ForgetSettings(PrivacySettings):
    """`rlfeed forget`: where to send the request and how to reach ClickHouse. Env prefix `RLFEED_`."""

    forget_operator_key: SecretStr | None = None
    """An operator API key (tenant `dashboard_operator_tenant`) for the stack's dashboard,
    needed when API keys are configured and the stack owns the embedded ClickHouse."""
    forget_timeout_s: float = 120.0
    """How long the broker may take to acknowledge the request, and ClickHouse the deletes."""


def produce_forget(bootstrap: str, settings: ForgetSettings, tenant_id: str, user_id: str, requested_by: str) -> str:
    """Write the ForgetEvent (acks=all); return its event id."""
    from confluent_kafka import Producer

    from schemas.codec import encode
    from schemas.events import ForgetEvent
    from schemas.topics import FORGET_REQUESTS
    from services.kafka.producers import producer_config
    from services.kafka.topics import ensure_topics

    ensure_topics(bootstrap, settings.topic_prefix)
    ev = ForgetEvent.for_user(tenant_id, user_id, requested_by=requested_by)
    errors: list[str] = []
    producer = Producer({**producer_config(bootstrap, settings), "acks": "all"})
    producer.produce(
        FORGET_REQUESTS.full_name(settings.topic_prefix),
        encode(ev),
        ev.event_id.encode(),
        on_delivery=lambda err, _msg: errors.append(str(err)) if err is not None else None,
    )
    if producer.flush(settings.forget_timeout_s) or errors:
        raise RuntimeError(f"forget-requests.v1: not acknowledged: {errors or 'timeout'}")
    return ev.event_id


def delete_rows(settings: ForgetSettings, tenant_id: str, user_id: str) -> dict[str, int]:
    """Delete the user's ClickHouse rows the way the deployment allows (see the module doc)."""
    from services.clickhouse import migrations
    from services.clickhouse.client import connect
    from services.privacy.forget import delete_user
    from services.stack import state

    url = settings.clickhouse_url
    stack = state.read(settings.home_dir.resolve()) if url is None else None
    if stack is not None:
        dashboard = stack.get("dashboard_url")
        if not dashboard:
            raise RuntimeError(
                "the running stack owns the embedded ClickHouse and serves no dashboard: enable it "
                "(RLFEED_DASHBOARD_ENABLED) or stop the stack, then run this again"
            )
        import httpx

        key = settings.forget_operator_key
        headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}
        r = httpx.post(
            f"{dashboard.rstrip('/')}/api/forget",
            json={"tenant_id": tenant_id, "user_id": user_id},
            headers=headers,
            timeout=settings.forget_timeout_s,
        )
        if r.status_code != 200:
            raise RuntimeError(f"the stack's dashboard answered {r.status_code}: {r.text[:300]}")
        return r.json()["deleted"]
    client = connect(url or settings.embedded_clickhouse_url)
    migrations.apply(client)
    return delete_user(client, tenant_id, user_id)


def forget_cli(user_id: str, tenant_id: str, requested_by: str) -> int:
    """The command: 0 when both the request and the deletes went through."""
    from pydantic import ValidationError

    from schemas.events import ForgetEvent
    from services.kafka.embedded import find_bootstrap

    settings = ForgetSettings()
    try:
        ForgetEvent.for_user(tenant_id, user_id)
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"{'.'.join(map(str, first['loc'])) or 'user_id'}: {first['msg']}", file=sys.stderr)
        return 2
    bootstrap = find_bootstrap(settings.kafka_url, settings.home_dir)
    if bootstrap is None:
        print(
            "no broker: run `rlfeed up` or set RLFEED_KAFKA_URL (the request must reach the stream workers)",
            file=sys.stderr,
        )
        return 1
    try:
        event_id = produce_forget(bootstrap, settings, tenant_id, user_id, requested_by)
        deleted = delete_rows(settings, tenant_id, user_id)
    except Exception as exc:
        print(f"rlfeed forget: {exc}", file=sys.stderr)
        return 1
    out = {"tenant_id": tenant_id, "user_id": user_id, "forget_event_id": event_id, "deleted": deleted}
    print(orjson.dumps(out).decode())
    return 0
