"""PII redaction: hand-written positives and negatives, settings, the sink's row wrapper."""

from __future__ import annotations

import base64

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.events import DeadLetterEvent, FeedbackEvent, FeedbackKind
from services.privacy import redact
from services.privacy.redact import Redactor, Signals, luhn_ok, redact_specs
from services.privacy.settings import PrivacySettings
from tests.factories import generation

R = Redactor()

POSITIVES = [
    ("write to john.doe+news@example.co.uk today", "write to [EMAIL] today"),
    ("Contact: ANNA_M@mail-server.example.org.", "Contact: [EMAIL]."),
    ("call +1 (555) 123-4567 tomorrow", "call [PHONE] tomorrow"),
    ("call +44 20 7946 0958", "call [PHONE]"),
    ("my number is 555-123-4567.", "my number is [PHONE]."),
    ("(555) 123-4567", "[PHONE]"),
    ("appelle le 06 12 34 56 78", "appelle le [PHONE]"),
    ("Tel. 030 12345678", "Tel. [PHONE]"),
    ("card 4111 1111 1111 1111 exp 12/27", "card [CARD] exp 12/27"),
    ("card 4111-1111-1111-1111", "card [CARD]"),
    ("OPENAI_API_KEY=sk-proj-abcdefghijklmnopqrstuvwxyz123456", "OPENAI_API_KEY=[API_KEY]"),
    ("use sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWx here", "use [API_KEY] here"),
    ("aws AKIAIOSFODNN7EXAMPLE secret", "aws [AWS_KEY] secret"),
    ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "token [API_KEY]"),
    ("slack xoxb-1234567890-abcdefghij", "slack [API_KEY]"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "stripe [API_KEY]"),
    ("rlfeed key rlf_0123456789ab_" + "A" * 20 + "b" * 23, "rlfeed key [API_KEY]"),
    ("Authorization: Bearer abcdef1234567890XYZ", "Authorization: Bearer [TOKEN]"),
    ("authorization: bearer abc.def-ghi_jkl~mn0", "authorization: bearer [TOKEN]"),
    (
        "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        "jwt [TOKEN]",
    ),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA75\n-----END RSA PRIVATE KEY----- done", "[PRIVATE_KEY] done"),
    ("password: hunter2abc", "password: [SECRET]"),
    ("db_password=Pa55word!x ok", "db_password=[SECRET] ok"),
    ("sha 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "sha [SECRET]"),
    ("b64 aGVsbG8gd29ybGQgdGhpcyBpcyBhIHNlY3JldCBrZXkgMTIz==", "b64 [SECRET]"),
    ("from 192.168.1.10 to 10.0.0.1.", "from [IP] to [IP]."),
    ("first_last@example.com wrote", "[EMAIL] wrote"),
]

NEGATIVES = [
    "In 2023 we sold 1,234,567 units at $19.99 each.",
    "The meeting is on 2024-01-15 at 10:30, or 01-02-2024 10:30, or 03/04/2025.",
    "Upgrade to version 1.2.3 (build 4521) before 3 pm.",
    "The 10-20-30 rule; pi is 3.14159265358979; e is 2.718281828.",
    "ISBN 978-3-16-148410-0 and order number 1234567890123.",
    "Internationalization and counterrevolutionaries are long words.",
    "See https://github.com/PrimeIntellect-ai/prime-rl/blob/main/src/prime_rl/entrypoints/trainer.py",
    "Email me @ the office; tag @alice on the thread.",
    "He scored 98 out of 100, a 98% rate, over 12 months (2019-2023).",
    "Temperatures range from -40 to +45 degrees; the ratio is 16:9.",
    "The password must be long, and the token is refreshed daily.",
    "Use a Bearer token in the header.",
    "The token and the key are refreshed every 24 hours; the password expires in 90 days.",
    "API key, access token and password fields are 3 of the 12 settings.",
    "A task-force of risk-averse people used sk-learn.",
    "Coordinates 48.8584, 2.2945 and 1.2.3.4.5 are not addresses.",
    "Call 911 or 112 in an emergency; the code is 4521.",
    "Not addresses: 999.1.1.1, v1.2.3.4 and x10.0.0.1.",
    "",
]


@pytest.mark.parametrize(("text", "expected"), POSITIVES)
def test_redacts(text: str, expected: str) -> None:
    assert R.text(text) == expected


@pytest.mark.parametrize("text", NEGATIVES)
def test_leaves_ordinary_text(text: str) -> None:
    assert R.text(text) == text


PROSE_ABOUT_SECRETS = [
    "Each token costs 3 cents, and the key idea is that 2 passwords are better than 1.",
    "The API key rotates every 90 days and the access token every 15 minutes.",
    "Keys 1 to 4 open the doors; token ring networks ran at 16 Mbit/s in 1989.",
    "Pick a password of 12 characters or more; never share your secret keys with 3rd parties.",
    "Tokenization splits 1000 words into about 1300 tokens; the keyboard has 104 keys.",
]
"""Ordinary prose with digits that mentions tokens, keys, passwords and secrets: no key,
token or secret detector may even run on it (their cheap pre-check must stay closed)."""


@pytest.mark.parametrize("text", PROSE_ABOUT_SECRETS)
def test_prose_about_tokens_keys_and_passwords_runs_no_detector(text: str) -> None:
    assert R.text(text) == text
    sig = Signals(text)
    ran = [(r.kind, r.placeholder) for r in R.rules if r.wanted(sig)]
    assert [k for k in ran if k[0] in ("token", "api_key", "secret", "ip")] == []


@pytest.mark.parametrize(
    "text",
    [
        "Note: the password policy changed in 2021 (see section 4).",
        "Set the key = value pairs in 3 files; token: optional.",
        "The secret: 42 is the answer.",
        "password = [SECRET] was redacted in 2020",
    ],
)
def test_prose_with_a_colon_or_equals_near_a_keyword_is_left_alone(text: str) -> None:
    assert R.text(text) == text


def _ungated(text: str) -> str:
    """Every detector run, whatever the pre-check says."""
    for rule in R.rules:
        text = rule.apply(text)
    return text


FRAGMENTS = sorted(
    {w for t, _ in POSITIVES for w in t.split()}
    | {w for t in NEGATIVES + PROSE_ABOUT_SECRETS for w in t.split()}
    | {"password:", "PASSWORD=", "Api_Key=", "ACCESS-TOKEN:", "auth_token =", "BEARER", "bEaReR", "sk-", "Sk-"}
    | {"AKIA", "eyJ", "-----BEGIN", "PRIVATE", "KEY-----", "@", "+", "0", "192.168.0.1", "x" * 8 + "1" * 8}
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=12),
    st.lists(st.sampled_from([" ", "", "\n", "=", ":", "_", "-", "."]), min_size=12, max_size=12),
    st.sampled_from(["", "1", " 7", "@"]),
)
def test_the_pre_check_never_loses_a_detection(words: list[str], seps: list[str], tail: str) -> None:
    # On text with a digit or an @, the pre-check only skips detectors that cannot match.
    text = "".join(w + sep for w, sep in zip(words, seps, strict=False)) + tail
    if Signals(text).anything:
        assert R.text(text) == _ungated(text)


def test_a_secret_without_any_digit_is_missed() -> None:
    # the documented price of the cheap pre-check (services/privacy/redact.py, Signals)
    assert R.text("Authorization: Bearer abcdefghijklmnopqrst") == "Authorization: Bearer abcdefghijklmnopqrst"
    assert R.text("Authorization: Bearer abcdefghijklmnopqrs7") == "Authorization: Bearer [TOKEN]"


def test_luhn() -> None:
    assert luhn_ok("4111 1111 1111 1111")
    assert not luhn_ok("4111 1111 1111 1112")


def test_kinds_and_custom_patterns() -> None:
    only_email = Redactor(kinds=["email"])
    assert only_email.text("a@b.example +1 555 123 4567") == "[EMAIL] +1 555 123 4567"
    custom = Redactor(kinds=[], patterns={"order_id": r"ORD-[0-9]{8}"})
    assert custom.text("order ORD-12345678 shipped") == "order [ORDER_ID] shipped"
    assert custom.text("nothing here") == "nothing here"


def test_settings_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RLFEED_REDACT_KINDS", '["phone"]')
    monkeypatch.setenv("RLFEED_REDACT_PATTERNS", '{"ticket": "TCK-\\\\d+"}')
    s = PrivacySettings()
    r = Redactor.from_settings(s)
    assert r is not None
    assert r.text("x@y.example TCK-42 +33 6 12 34 56 78") == "x@y.example [TICKET] [PHONE]"
    monkeypatch.setenv("RLFEED_REDACT_ENABLED", "false")
    assert Redactor.from_settings(PrivacySettings()) is None
    assert s.forget_refresh_s == 10.0
    monkeypatch.setenv("RLFEED_FORGET_REFRESH_S", "2.5")
    assert PrivacySettings().forget_refresh_s == 2.5


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"RLFEED_REDACT_KINDS": '["email", "ssn"]'}, "redact_kinds"),
        ({"RLFEED_REDACT_PATTERNS": '{"bad": "([a-"}'}, "redact_patterns.bad"),
        ({"RLFEED_REDACT_PATTERNS": '{"empty": "x*"}'}, "redact_patterns.empty"),
        ({"RLFEED_REDACT_PATTERNS": '{"no label": "x"}'}, "redact_patterns"),
        ({"RLFEED_FORGET_REFRESH_S": "0"}, "forget_refresh_s"),
    ],
)
def test_bad_settings_name_the_field(monkeypatch: pytest.MonkeyPatch, env: dict, field: str) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        PrivacySettings()


def test_raw_and_b64_keep_unchanged_bytes() -> None:
    data = b'{"completion": "mail bob@example.com"}\xff\xfe'
    assert R.raw(data) == b'{"completion": "mail [EMAIL]"}\xff\xfe'
    clean = base64.b64encode(b"\x00\x01 nothing personal").decode()
    assert R.b64(clean) is clean
    dirty = base64.b64encode(b"call +1 (555) 123-4567").decode()
    assert base64.b64decode(R.b64(dirty)) == b"call [PHONE]"
    assert R.b64(None) is None


def test_sink_rows_are_redacted() -> None:
    from services.sink import rows

    redact.configure(Redactor())
    try:
        specs = rows.SPECS  # already wrapped by rows.py's one redact_specs call
        gen = generation("gen-1", completion="reach me at jane@example.com", prompt="my phone: +1 555 123 4567")
        row = specs["generations.v1"].as_dict(gen)
        assert row["completion"] == "reach me at [EMAIL]"
        assert row["prompt"] == "my phone: [PHONE]"
        fb = FeedbackEvent(
            generation_id="gen-1", kind=FeedbackKind.EDIT, edited_text="jane@example.com", final=True, user_id="u"
        )
        assert specs["feedback.v1"].as_dict(fb)["edited_text"] == "[EMAIL]"
        letter = DeadLetterEvent(
            source_topic="feedback.v1",
            original_b64=base64.b64encode(b'{"edited_text": "jane@example.com"').decode(),
            reason="invalid JSON near jane@example.com",
            rejected_by="test",
        )
        d = specs["dlq.v1"].as_dict(letter)
        assert base64.b64decode(d["original_b64"]) == b'{"edited_text": "[EMAIL]"'
        assert d["reason"] == "invalid JSON near [EMAIL]"
        # tables without free text keep their row function as is
        assert specs["model-updates.v1"].row is rows.model_update_tuple
        assert redact_specs({"x": rows.SPECS["model-updates.v1"]})["x"].row is rows.model_update_tuple
        redact.configure(None)  # redaction off: rows pass through
        assert specs["generations.v1"].as_dict(gen)["completion"] == "reach me at jane@example.com"
    finally:
        redact.reset()
