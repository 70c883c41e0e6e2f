"""PII redaction of free text: pure functions over strings, typed placeholders.

A match becomes a placeholder naming what was there (`[EMAIL]`, `[PHONE]`, `[CARD]`,
`[API_KEY]`, `[AWS_KEY]`, `[TOKEN]`, `[PRIVATE_KEY]`, `[SECRET]`, `[IP]`, or `[LABEL]`
of a custom pattern). Detectors are tuned against false positives on ordinary prose and
numbers (years, dates, prices, versions, quantities): a phone needs a `+`, the
`(555) 123-4567` / `555-123-4567` shape, or a leading 0 with 9-12 digits; a card number
must pass the Luhn check; a bare run of digits is never redacted.

Cost: `Redactor.text` first takes cheap signals of the text (`Signals`: is there a
digit, an `@`, how many digits, and for some detectors a marker the match cannot do
without, such as `-----BEGIN `, `eyJ`, `sk-`, or a `:`/`=` after `password`), and each
detector runs only when its signals are there; prose without a digit or an `@` is
returned as is without running any detector. Each detector's pre-check is a closure of
only the conditions it has (`Rule.gate`), cheapest first, so that prose with digits costs
a few attribute tests per detector. Markers of case-sensitive patterns are looked for in
the text itself, not its lower-cased copy, and the `key = value` detector needs the full
keyword (`api_key`, `access-token`, not `key` or `token`) and a `:` or `=`: ordinary
prose about tokens, keys and passwords runs none of them. Keys, tokens and secrets are
recognised only when they hold a digit (random ones of their length almost always do,
see `Signals`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache

from services.privacy.settings import KINDS, PrivacySettings

API_KEY_HINTS = (
    "sk-", "pk-", "rk-", "sk_", "pk_", "rk_", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",
    "xox", "AIza", "rlf_",
)  # fmt: skip
"""Prefixes of the vendor API keys the `api_key` detector knows (case-sensitive, as its pattern)."""
SECRET_KEYWORDS = (
    "passw", "pwd", "secret", "apikey", "api_key", "api-key",
    "accesstoken", "access_token", "access-token", "authtoken", "auth_token", "auth-token",
)  # fmt: skip
"""Lower-cased keywords the `key = value` detector needs (its pattern's alternatives)."""


def has_digit(s: str) -> bool:
    """Whether `s` holds an ASCII digit: ten substring scans (memchr) cost a fraction of
    one `\\d` regex search."""
    return (
        "0" in s or "1" in s or "2" in s or "3" in s or "4" in s
        or "5" in s or "6" in s or "7" in s or "8" in s or "9" in s
    )  # fmt: skip


def has_digit_bytes(b: bytes) -> bool:
    """`has_digit` of bytes."""
    return (
        b"0" in b or b"1" in b or b"2" in b or b"3" in b or b"4" in b
        or b"5" in b or b"6" in b or b"7" in b or b"8" in b or b"9" in b
    )  # fmt: skip


class Signals:
    """Cheap facts about a text, each computed once when a detector first asks; a detector
    runs only when the facts allow a match (`Rule.wanted`).

    Every built-in detector but the email one needs a digit in the text: phone, card and
    IP numbers by definition, keys, tokens and secrets because random strings of their
    length hold one (a 32-character base64 secret with a probability above 99.6%, a
    20-character AWS key id above 99.5%); one without any digit is missed.
    """

    __slots__ = ("_digits", "_lower", "_runs", "at", "digit", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.digit = has_digit(text)
        self.at = "@" in text
        self._lower: str | None = None
        self._digits = -1
        self._runs: dict[int, bool] = {}

    @property
    def anything(self) -> bool:
        return self.digit or self.at

    @property
    def lower(self) -> str:
        if self._lower is None:
            self._lower = self.text.lower()
        return self._lower

    @property
    def digits(self) -> int:
        """How many ASCII digits the text holds (one C pass: the UTF-8 bytes less the digits)."""
        if self._digits < 0:
            b = self.text.encode("utf-8", "surrogatepass")
            self._digits = len(b) - len(b.translate(None, _DIGIT_BYTES))
        return self._digits

    def has_run(self, n: int) -> bool:
        """Whether the text has a run of at least `n` characters without whitespace."""
        found = self._runs.get(n)
        if found is None:
            found = self._runs[n] = _run_pattern(n).search(self.text) is not None
        return found


_DIGIT_BYTES = b"0123456789"


@lru_cache(maxsize=16)
def _run_pattern(n: int) -> re.Pattern[str]:
    return re.compile(rf"\S{{{n}}}")


def _digits(s: str) -> int:
    return sum(c.isdigit() for c in s)


def _starts_word(m: re.Match[str], also: str = "") -> bool:
    """Whether the match starts a word: the character before it is no word character
    (nor one of `also`)."""
    i = m.start()
    if i == 0:
        return True
    c = m.string[i - 1]
    return not (c.isalnum() or c == "_" or c in also)


def luhn_ok(number: str) -> bool:
    """Whether the digits of `number` pass the Luhn checksum (payment card numbers do)."""
    digits = [int(c) for c in number if c.isdigit()]
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Rule:
    """One detector: a pattern, its placeholder, and an optional check of each match."""

    kind: str
    pattern: re.Pattern[str]
    placeholder: str
    check: Callable[[re.Match[str]], bool] | None = None
    """A match is redacted only when this says so (digit counts, Luhn, what precedes it:
    a check is cheaper than a lookbehind, which stops the regex engine from skipping
    ahead to the first possible character)."""
    keep_group: int | None = None
    """Keep this group of the match before the placeholder (`Bearer [TOKEN]`)."""
    hints: tuple[str, ...] = ()
    """The rule runs only when the lower-cased text holds one of these (empty: no condition)."""
    exact_hints: tuple[str, ...] = ()
    """The rule runs only when the text itself holds one of these (case-sensitive patterns)."""
    any_chars: str = ""
    """The rule runs only when the text holds at least one of these characters."""
    needs_digit: bool = True
    """The rule runs only when the text holds a digit (see `Signals`)."""
    min_digits: int = 0
    """The rule runs only when the text holds at least this many digits."""
    min_run: int = 0
    """The rule runs only when the text has a run of this many non-space characters."""
    chars: str = ""
    """The rule runs only when the text holds each of these characters, as many times as
    listed ("..." : three dots)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "gate", _gate(self))

    def wanted(self, sig: Signals) -> bool:
        """Whether the text's signals allow a match at all."""
        return self.gate(sig)  # type: ignore[attr-defined]

    def apply(self, text: str) -> str:
        if self.check is None and self.keep_group is None:
            return self.pattern.sub(self.placeholder, text)
        return self.pattern.sub(self._replace, text)

    def _replace(self, m: re.Match[str]) -> str:
        if self.check is not None and not self.check(m):
            return m.group()
        if self.keep_group is not None:
            return f"{m.group(self.keep_group)}{self.placeholder}"
        return self.placeholder


def _gate(rule: Rule) -> Callable[[Signals], bool]:
    """`rule.wanted` as a closure of only the conditions the rule has, cheapest first
    (substring tests on the text, the digit count, a run of non-space characters, the
    keywords): one call and a few C-level tests per detector on text with a digit."""
    tests: list[Callable[[Signals], bool]] = []
    if rule.needs_digit:
        tests.append(lambda sig: sig.digit)
    for c in sorted(set(rule.chars), key=rule.chars.index):
        n = rule.chars.count(c)
        if n == 1:
            tests.append(lambda sig, c=c: c in sig.text)
        else:
            tests.append(lambda sig, c=c, n=n: sig.text.count(c) >= n)
    if len(rule.any_chars) == 1:
        tests.append(lambda sig, c=rule.any_chars: c in sig.text)
    elif len(rule.any_chars) == 2:
        tests.append(lambda sig, a=rule.any_chars[0], b=rule.any_chars[1]: a in sig.text or b in sig.text)
    elif rule.any_chars:
        tests.append(lambda sig, cs=tuple(rule.any_chars): any(c in sig.text for c in cs))
    if rule.exact_hints:
        exact = re.compile("|".join(map(re.escape, rule.exact_hints)))
        tests.append(lambda sig: exact.search(sig.text) is not None)
    if rule.min_digits:
        tests.append(lambda sig, n=rule.min_digits: sig.digits >= n)
    if rule.min_run:
        tests.append(lambda sig, n=rule.min_run: len(sig.text) >= n and sig.has_run(n))
    if len(rule.hints) == 1:
        tests.append(lambda sig, h=rule.hints[0]: h in sig.lower)
    elif rule.hints:
        hints = re.compile("|".join(map(re.escape, rule.hints)))
        tests.append(lambda sig: hints.search(sig.lower) is not None)
    if not tests:
        return lambda sig: True
    gate = tests[-1]
    for test in reversed(tests[:-1]):
        gate = _both(test, gate)
    return gate


def _both(first: Callable[[Signals], bool], then: Callable[[Signals], bool]) -> Callable[[Signals], bool]:
    return lambda sig: first(sig) and then(sig)


def _rule(
    kind: str, pattern: str, placeholder: str, check: Callable[[re.Match[str]], bool] | None = None, **kw
) -> Rule:
    return Rule(kind, re.compile(pattern), placeholder, check, **kw)


_B64 = r"A-Za-z0-9+/_\-"
BUILTIN_RULES: tuple[Rule, ...] = (
    # Private keys and tokens first: their bodies would otherwise read as secrets.
    _rule(
        "token",
        r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)",
        "[PRIVATE_KEY]",
        exact_hints=("-----BEGIN ",),
    ),
    _rule(
        "token", r"\b([Bb][Ee][Aa][Rr][Ee][Rr]\s+)[A-Za-z0-9._~+/=-]{12,}", "[TOKEN]", keep_group=1, hints=("bearer",)
    ),
    _rule("token", r"\beyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}", "[TOKEN]", exact_hints=("eyJ",)),
    _rule(
        "email",
        r"[A-Za-z0-9_][A-Za-z0-9_.%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b",
        "[EMAIL]",
        hints=("@",),
        needs_digit=False,
    ),
    _rule(
        "api_key",
        r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA)[0-9A-Z]{16}\b",
        "[AWS_KEY]",
        exact_hints=("AKIA", "ASIA", "AGPA", "AIDA", "AROA", "ANPA"),
    ),
    _rule(
        "api_key",
        r"\b(?:(?:sk|pk|rk)-(?:[A-Za-z0-9]+-)*[A-Za-z0-9_-]{20,}"
        r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"
        r"|gh[pousr]_[A-Za-z0-9]{36,255}|github_pat_[A-Za-z0-9_]{22,255}"
        r"|xox[abposr]-[A-Za-z0-9-]{10,}"
        r"|AIza[0-9A-Za-z_-]{35}"
        r"|rlf_[0-9a-f]{12}_[A-Za-z0-9_-]{43})",
        "[API_KEY]",
        any_chars="-_",
        exact_hints=API_KEY_HINTS,
    ),
    _rule(
        "secret",
        r"\b(?=[0-9a-fA-F]*[a-fA-F])(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{32,}\b",
        "[SECRET]",
        min_run=32,
    ),
    _rule(
        "secret",
        rf"(?<![{_B64}=])(?=[{_B64}]*\d)(?=[{_B64}]*[a-z])(?=[{_B64}]*[A-Z])[{_B64}]{{32,}}={{0,2}}(?![{_B64}=])",
        "[SECRET]",
        min_run=32,
    ),
    _rule(
        "token",
        r"(?i)(?<![a-z0-9])((?:password|passwd|pwd|secret|api[_-]?key|access[_-]?token|auth[_-]?token)\s*[:=]\s*)"
        r"(?!\[)(?=\S*\d)[^\s,;'\"]{8,}",
        "[SECRET]",
        keep_group=1,
        any_chars=":=",
        hints=SECRET_KEYWORDS,
    ),
    _rule(
        "card",
        r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])",
        "[CARD]",
        lambda m: 13 <= _digits(m.group()) <= 19 and luhn_ok(m.group()),
        min_digits=13,
    ),
    _rule(
        "ip",
        r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?![\w]|\.\d)",
        "[IP]",
        lambda m: _starts_word(m, ".") and all(int(part) <= 255 for part in m.group().split(".")),
        min_digits=4,
        chars="...",
    ),
    _rule("phone", r"(?<![\w+])\+\d(?:[ .()-]{0,2}\d){6,14}(?![\d])", "[PHONE]", min_digits=7, chars="+"),
    _rule(
        "phone",
        r"(?<![\w.+-])(?:\(\d{3}\)\s?|\d{3}[-. ])\d{3}[-. ]\d{4}(?![\w-]|[.,]\d)",
        "[PHONE]",
        min_digits=10,
    ),
    _rule(
        "phone",
        r"(?<![\w.+/:-])0\d{1,4}(?:[ -]\d{2,8}){1,4}(?![\w:/-]|[.,]\d)",
        "[PHONE]",
        lambda m: 9 <= _digits(m.group()) <= 12,
        min_digits=9,
        chars="0",
    ),
)
"""The built-in detectors, in the order they run (earlier ones win overlaps)."""


class Redactor:
    """Replaces PII in text with typed placeholders. Stateless after construction."""

    def __init__(self, kinds: Iterable[str] = KINDS, patterns: dict[str, str] | None = None) -> None:
        wanted = set(kinds)
        self.rules = tuple(r for r in BUILTIN_RULES if r.kind in wanted)
        self.custom = tuple(
            Rule("custom", re.compile(p), f"[{label.upper()}]") for label, p in (patterns or {}).items()
        )

    @classmethod
    def from_settings(cls, settings: PrivacySettings) -> Redactor | None:
        """The redactor the settings ask for; None when redaction is off."""
        if not settings.redact_enabled:
            return None
        return cls(settings.redact_kinds, settings.redact_patterns)

    def text(self, text: str) -> str:
        """`text` with every detected item replaced by its placeholder."""
        if self.rules and text and ("@" in text or has_digit(text)):
            sig = Signals(text)
            if sig.anything:
                for rule in self.rules:
                    if rule.gate(sig):  # type: ignore[attr-defined]
                        text = rule.apply(text)
        for rule in self.custom:
            text = rule.apply(text)
        return text

    def optional(self, text: str | None) -> str | None:
        """`text` redacted, None kept."""
        return None if text is None else self.text(text)

    def raw(self, data: bytes) -> bytes:
        """Bytes redacted as UTF-8 text; bytes that are not UTF-8 pass through
        (surrogateescape), so unchanged bytes stay byte for byte."""
        text = data.decode("utf-8", "surrogateescape")
        redacted = self.text(text)
        return data if redacted == text else redacted.encode("utf-8", "surrogateescape")

    def b64(self, value: str | None) -> str | None:
        """A base64 payload (a dead letter's original bytes) redacted: decoded, redacted as
        text, re-encoded; returned unchanged when nothing was found or it is not base64."""
        if value is None:
            return None
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return self.text(value)
        redacted = self.raw(data)
        return value if redacted is data else base64.b64encode(redacted).decode()


@lru_cache(maxsize=1)
def _from_environment() -> Redactor | None:
    return Redactor.from_settings(PrivacySettings())


_configured: list[Redactor | None] = []


def configure(redactor: Redactor | None) -> None:
    """Use `redactor` in this process instead of the one the environment asks for (tests)."""
    _configured[:] = [redactor]


def reset() -> None:
    """Go back to the redactor the environment asks for (re-read on next use)."""
    _configured.clear()
    _from_environment.cache_clear()


def current() -> Redactor | None:
    """This process's redactor: the configured one, else `PrivacySettings()` from the
    environment (read once); None when redaction is off."""
    return _configured[0] if _configured else _from_environment()


TEXT_COLUMNS = frozenset({"prompt", "completion", "edited_text", "chosen", "rejected", "reason", "error"})
"""ClickHouse columns that hold free text (redacted as text)."""
B64_COLUMNS = frozenset({"original_b64"})
"""ClickHouse columns that hold base64 payloads (decoded, redacted, re-encoded)."""


def redacting_row(row: Callable, columns: tuple[str, ...]) -> Callable:
    """Wrap a row function (event -> tuple in `columns` order) so its free-text columns
    are redacted with `current()` (no-op while redaction is off); returned unchanged when
    it has no such column."""
    text_at = tuple(i for i, c in enumerate(columns) if c in TEXT_COLUMNS)
    b64_at = tuple(i for i, c in enumerate(columns) if c in B64_COLUMNS)
    if not text_at and not b64_at:
        return row

    def redacted(event: object) -> tuple:
        values = row(event)
        r = current()
        if r is None:
            return values
        out = list(values)
        for i in text_at:
            v = out[i]
            if v is not None:
                out[i] = r.text(v)
        for i in b64_at:
            out[i] = r.b64(out[i])
        return tuple(out)

    redacted.__doc__ = row.__doc__
    redacted.__wrapped__ = row  # type: ignore[attr-defined]
    return redacted


def redact_specs(specs: dict) -> dict:
    """The sink's table specs (`services.sink.rows.SPECS`) with every free-text column
    redacted (see `redacting_row`); the one call the sink makes."""

    return {name: dataclasses.replace(s, row=redacting_row(s.row, s.columns)) for name, s in specs.items()}
