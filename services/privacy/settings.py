"""The privacy settings every process that redacts reads (`RLFEED_` environment variables)."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from services.config import RlfeedSettings

KINDS = ("email", "phone", "card", "api_key", "token", "secret", "ip")
"""The built-in detector kinds, in the order they run (see services/privacy/redact.py)."""


class PrivacySettings(RlfeedSettings):
    """PII redaction before text reaches ClickHouse or samples.v1, and the forget filter."""

    redact_enabled: bool = True
    """Redact PII in free text (prompts, completions, edits, dead-letter payloads) before it
    reaches ClickHouse or leaves the stream worker on samples.v1."""
    redact_kinds: list[str] = Field(default_factory=lambda: list(KINDS))
    """Built-in detectors to run, any of: email, phone, card (Luhn-checked), api_key
    (sk-..., AKIA..., ghp_..., xox..-, AIza..., rlfeed keys), token (Bearer ..., JWTs,
    PEM private keys), secret (long hex or base64 runs mixing digits and letters), ip (IPv4).
    JSON list, e.g. `RLFEED_REDACT_KINDS='["email","phone"]'`."""
    redact_patterns: dict[str, str] = Field(default_factory=dict)
    """Custom patterns, label -> Python regex; a match becomes `[LABEL]` (upper-cased).
    JSON object, e.g. `RLFEED_REDACT_PATTERNS='{"order_id": "ORD-[0-9]{8}"}'`. They run
    after the built-in detectors."""
    forget_enabled: bool = True
    """The stream worker reads forget-requests.v1 and drops the samples of forgotten users."""
    forget_load_timeout_s: float = Field(30.0, gt=0)
    """How long the stream worker waits, at start, to read forget-requests.v1 to its end
    before it joins anything."""
    forget_refresh_s: float = Field(10.0, gt=0)
    """How often the stream worker catches up with forget-requests.v1 once running (it
    opens a consumer, reads what is new and closes it): a forget request takes effect on
    samples within this many seconds."""

    @field_validator("redact_kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"redact_kinds: unknown kinds {unknown}; known: {list(KINDS)}")
        return kinds

    @field_validator("redact_patterns")
    @classmethod
    def _patterns_compile(cls, patterns: dict[str, str]) -> dict[str, str]:
        for label, pattern in patterns.items():
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", label):
                raise ValueError(f"redact_patterns: label {label!r} must be a word (letters, digits, _)")
            try:
                compiled = re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redact_patterns.{label}: invalid regex: {exc}") from None
            if compiled.search(""):
                raise ValueError(f"redact_patterns.{label}: matches the empty string")
        return patterns
