"""Pseudonymous user ids and generation ids (pure functions)."""

from __future__ import annotations

import hashlib
import re
import uuid

_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
ANONYMOUS = "anonymous"


def new_generation_id() -> str:
    """A fresh generation id: `gen-` and 32 hex characters."""
    return f"gen-{uuid.uuid4().hex}"


def is_valid_id(value: str) -> bool:
    """Whether `value` fits the contract's Id pattern (schemas.events.Id)."""
    return bool(_ID.match(value))


def pseudonymous_user_id(raw: str | None, *, salt: str = "", hash_all: bool = False) -> str:
    """The user id a generation event may carry.

    An app should send pseudonymous ids already; a value that looks personal (an email,
    anything with `@`), that does not fit the Id pattern, or every value when `hash_all`
    is set, is replaced by `h-` + a salted SHA-256 prefix, which is stable per user, so the
    same user still groups together. No value at all gives `anonymous`.
    """
    if raw is None or not raw.strip():
        return ANONYMOUS
    raw = raw.strip()
    if not hash_all and "@" not in raw and is_valid_id(raw):
        return raw
    return "h-" + hashlib.sha256(f"{salt}\x00{raw}".encode()).hexdigest()[:32]


def session_id_or_none(raw: str | None, *, salt: str = "") -> str | None:
    """A session id fit for an event: kept when valid, hashed when not, None when absent."""
    if raw is None or not raw.strip():
        return None
    raw = raw.strip()
    return raw if is_valid_id(raw) else "h-" + hashlib.sha256(f"{salt}\x00{raw}".encode()).hexdigest()[:32]
