"""orjson encoding and decoding of events, with one typed error for bad input.

`decode` never lets a raw exception escape: invalid UTF-8, invalid JSON, a non-object,
a wrong type, an unknown field or an out-of-range value all become `InvalidEvent`,
which names the offending field and keeps the original bytes for the dead-letter topic.

The stream join decodes its two inputs through `schemas.fast` (`decode_generation`,
`decode_feedback`): msgspec mirrors of the models for valid input, this module's
`decode` for the verdict and the error on everything the fast path refuses.
"""

from __future__ import annotations

import base64
import hashlib
from typing import TypeVar

import orjson
from pydantic import ValidationError

from schemas.events import DeadLetterEvent, Event

E = TypeVar("E", bound=Event)

MAX_MESSAGE_BYTES = 1_048_576
"""Largest message value accepted (1 MiB); larger ones are dead-lettered unparsed."""


class InvalidEvent(ValueError):
    """Input that is not a valid event. `field` is dotted (`sampling.top_p`) or None."""

    def __init__(self, reason: str, field: str | None, raw: bytes) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field
        self.raw = raw


def _first_error(err: ValidationError) -> tuple[str | None, str]:
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"]
    # Errors raised in model validators carry no location; ours start with "field: ".
    if not loc and ": " in msg:
        head, _, rest = msg.removeprefix("Value error, ").partition(": ")
        if head.replace("_", "").replace(".", "").isalnum():
            return head, rest
    field = ".".join(loc) or None
    extra = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return field, f"{msg.removeprefix('Value error, ')}{extra}"


def decode(model: type[E], raw: bytes) -> E:
    """Parse and validate one message value as `model`, or raise `InvalidEvent`."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise InvalidEvent(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE_BYTES}", None, raw)
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent(f"invalid JSON: {exc}", None, raw) from None
    if not isinstance(obj, dict):
        raise InvalidEvent(f"expected a JSON object, got {type(obj).__name__}", None, raw)
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        field, reason = _first_error(exc)
        raise InvalidEvent(reason, field, raw) from None
    except RecursionError:
        raise InvalidEvent("nesting too deep", None, raw) from None


def encode(event: Event) -> bytes:
    """Serialise an event to compact UTF-8 JSON."""
    return orjson.dumps(event.model_dump(mode="json", exclude_none=True))


def key_of(event: Event, key_field: str) -> bytes | None:
    """The Kafka key of an event: the UTF-8 value of its key field (a `*_b64` field,
    like a dead letter's original key, is decoded back to its bytes)."""
    value = getattr(event, key_field, None)
    if value is None:
        return None
    return base64.b64decode(value) if key_field.endswith("_b64") else str(value).encode()


MAX_DEAD_LETTER_ORIGINAL_BYTES = 600_000
"""Most original bytes a dead letter carries: base64 grows them by 4/3, and the letter must
stay under the broker's 1 MiB message limit (a bigger one would be refused by the broker)."""


def fit_for_dead_letter(err: InvalidEvent, limit: int = MAX_DEAD_LETTER_ORIGINAL_BYTES) -> InvalidEvent:
    """`err`, or a copy whose original bytes are cut to their first `limit`, saying so."""
    if len(err.raw) <= limit:
        return err
    note = f"{err.reason} (original of {len(err.raw)} bytes truncated to its first {limit})"
    return InvalidEvent(note, err.field, err.raw[:limit])


def dead_letter(
    error: InvalidEvent,
    *,
    source_topic: str,
    rejected_by: str,
    key: bytes | None = None,
    partition: int = -1,
    offset: int = -1,
) -> DeadLetterEvent:
    """The dead-letter event for rejected input, carrying the original bytes.

    Input from Kafka (offset >= 0) gets a deterministic event id, so a redelivered bad
    message produces the same dead letter again and downstream deduplicates it. Originals
    over `MAX_DEAD_LETTER_ORIGINAL_BYTES` are cut, and the reason says so.
    """
    error = fit_for_dead_letter(error)
    fields = {}
    if offset >= 0:
        origin = f"{rejected_by}|{source_topic}|{partition}|{offset}".encode()
        fields["event_id"] = hashlib.sha256(origin).hexdigest()[:32]
    return DeadLetterEvent(
        **fields,
        source_topic=source_topic,
        source_partition=partition,
        source_offset=offset,
        key_b64=None if key is None else base64.b64encode(key).decode(),
        original_b64=base64.b64encode(error.raw).decode(),
        error_field=error.field[:512] if error.field else None,
        reason=str(error)[:4096],
        rejected_by=rejected_by,
    )
