"""Turning request bodies into events: pure functions, no I/O.

Each event is validated by `schemas.codec.decode`, so the messages match what every other
component says about the same input. The gateway binds two fields itself: `tenant_id`
(from the API key; a body that names another tenant is rejected) and, for a single event,
`event_id` from the `Idempotency-Key` header.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.codec import InvalidEvent, decode, fit_for_dead_letter
from schemas.events import Event, new_event_id

_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:@/+=-")


class ApiError(Exception):
    """An error answered as `{"error": {"message", "field", "type"}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        type: str = "invalid_request_error",
        retry_after_s: int | None = None,
        invalid: list[InvalidEvent] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.type = type
        self.retry_after_s = retry_after_s
        self.invalid = invalid or []
        """The rejected events (for dlq.v1)."""

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "field": self.field, "type": self.type}}


@dataclass(frozen=True)
class Parsed:
    """One valid event and the digest of what the client sent (for idempotency conflicts)."""

    event: Event
    digest: bytes


def digest_of(obj: dict[str, Any]) -> bytes:
    """A stable digest of an event as the client sent it: key order and `event_time_ms`
    are ignored (a client that rebuilds the same signal to retry it gets a new timestamp)."""
    if "event_time_ms" in obj:
        obj = {k: v for k, v in obj.items() if k != "event_time_ms"}
    return hashlib.blake2b(orjson.dumps(obj, option=orjson.OPT_SORT_KEYS), digest_size=16).digest()


def check_idempotency_key(value: str | None) -> str | None:
    """The `Idempotency-Key` header as an event id, or ApiError if it cannot be one."""
    if value is None:
        return None
    if not 1 <= len(value) <= 128 or not set(value) <= _ID_CHARS:
        raise ApiError(
            422,
            "Idempotency-Key: must be 1-128 characters of A-Z a-z 0-9 . _ : @ / + = - (it becomes the event_id)",
            field="Idempotency-Key",
        )
    return value


def bind_event(
    model: type[Event], obj: Any, raw: bytes, tenant: str, event_id: str | None = None, field_prefix: str = ""
) -> Parsed:
    """Validate one event object for `tenant`; raise `InvalidEvent` naming the field.

    `raw` is what goes to dlq.v1 if it is rejected. Field names in errors carry
    `field_prefix` (e.g. `events.3.`).
    """

    def invalid(reason: str, field: str | None) -> InvalidEvent:
        name = f"{field_prefix}{field}" if field else (field_prefix.rstrip(".") or None)
        return InvalidEvent(reason, name, raw)

    if not isinstance(obj, dict):
        raise invalid(f"expected a JSON object, got {type(obj).__name__}", None)
    given_tenant = obj.get("tenant_id")
    if given_tenant is not None and given_tenant != tenant:
        raise invalid("set by the gateway from the API key; omit it", "tenant_id")
    if event_id is not None:
        if obj.get("event_id", event_id) != event_id:
            raise invalid("differs from the Idempotency-Key header", "event_id")
        obj = {**obj, "event_id": event_id}
    digest = digest_of(obj)
    fields = {**obj, "tenant_id": tenant}
    if "event_id" not in fields:
        fields["event_id"] = new_event_id()
    try:
        event = model.model_validate(fields)
    except (ValidationError, RecursionError, ValueError):
        # Slow path: let the codec phrase the error exactly as the rest of the system does.
        try:
            decode(model, orjson.dumps(fields))
        except InvalidEvent as err:
            raise invalid(err.reason, err.field) from None
        except (TypeError, orjson.JSONEncodeError):
            pass
        raise invalid("invalid event", None) from None
    return Parsed(event, digest)


def parse_single(model: type[Event], raw: bytes, tenant: str, idempotency_key: str | None) -> Parsed:
    """The event of a single-event request body."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise fit_for_dead_letter(InvalidEvent(f"invalid JSON: {exc}", None, raw)) from None
    try:
        return bind_event(model, obj, raw, tenant, idempotency_key)
    except InvalidEvent as err:
        raise fit_for_dead_letter(err) from None


def parse_batch(model: type[Event], raw: bytes, tenant: str, max_events: int) -> list[Parsed]:
    """The events of a batch body `{"events": [...]}`, all valid, or ApiError.

    Validation is all-or-nothing: one invalid event rejects the batch (422, naming
    `events.<i>.<field>` of the first), and nothing of it is produced.
    """
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _rejected(InvalidEvent(f"invalid JSON: {exc}", None, raw)) from None
    if not isinstance(obj, dict):
        raise _rejected(InvalidEvent(f"expected a JSON object, got {type(obj).__name__}", None, raw))
    unknown = sorted(set(obj) - {"events"})
    if unknown:
        raise _rejected(InvalidEvent('unknown field; the body is {"events": [...]}', unknown[0], raw))
    events = obj.get("events")
    if not isinstance(events, list):
        reason = "required" if events is None else f"expected a list, got {type(events).__name__}"
        raise _rejected(InvalidEvent(reason, "events", raw))
    if len(events) > max_events:
        raise ApiError(
            413, f"events: {len(events)} events exceed the limit of {max_events} per request", field="events"
        )
    parsed: list[Parsed] = []
    invalid: list[InvalidEvent] = []
    for i, item in enumerate(events):
        try:
            parsed.append(bind_event(model, item, b"", tenant, field_prefix=f"events.{i}."))
        except InvalidEvent as err:
            try:
                err.raw = orjson.dumps(item)
            except (TypeError, orjson.JSONEncodeError):
                err.raw = raw
            invalid.append(fit_for_dead_letter(err))
    if invalid:
        first = invalid[0]
        more = f" ({len(invalid) - 1} more invalid events)" if len(invalid) > 1 else ""
        raise ApiError(422, f"{first}{more}", field=first.field, type="invalid_event", invalid=invalid)
    return parsed


def _rejected(err: InvalidEvent) -> ApiError:
    return ApiError(422, str(err), field=err.field, type="invalid_event", invalid=[fit_for_dead_letter(err)])
