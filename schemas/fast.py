"""A fast, strict decoder for the stream join's two inputs, generations.v1 and feedback.v1.

The pydantic models in `schemas.events` stay the contract (and the JSON Schema); the
msgspec Structs here mirror `GenerationEvent` (with `SamplingParams`) and `FeedbackEvent`
field for field: same names, types, defaults, bounds, patterns and cross-field rules.
msgspec is stricter than pydantic's lax mode (no numeric strings, no `3.0` for an int,
no `1` for a bool, no integers beyond 64 bits), so its rule is:

    the fast path accepts only what the pydantic model accepts, with the same values.

Everything the fast path refuses goes to `schemas.codec.decode` (pydantic), which gives
the verdict and the error naming the field. `decode_generation` and `decode_feedback`
therefore accept and reject exactly what pydantic does, with the same `InvalidEvent`;
tests/test_schemas_fast.py checks both directions with hypothesis (valid events, and
events broken field by field). Input that only pydantic's lax mode accepts comes back
as the pydantic model, which has the same attributes as the Struct.

Ids use `\\A...\\Z` where the pydantic pattern says `^...$`: Python's `$` also matches
before a trailing newline, the Rust regex pydantic runs does not.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from schemas import events as ev
from schemas.codec import MAX_MESSAGE_BYTES, InvalidEvent, decode

_ID_PATTERN = r"\A[A-Za-z0-9._:@/+=-]+\Z"
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=ev.MAX_ID_CHARS, pattern=_ID_PATTERN)]
Text = Annotated[str, msgspec.Meta(max_length=ev.MAX_TEXT_CHARS)]
TimeMs = Annotated[int, msgspec.Meta(ge=0, le=10**14)]
TokenIds = Annotated[list[Annotated[int, msgspec.Meta(ge=0, lt=2**31)]], msgspec.Meta(max_length=ev.MAX_TOKENS)]
Logprobs = Annotated[list[Annotated[float, msgspec.Meta(le=0.0, ge=-1e4)]], msgspec.Meta(max_length=ev.MAX_TOKENS)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
FeedbackKindName = Literal["thumb", "rating", "accept", "reject", "edit", "copy", "regenerate", "dwell"]
_TERMINAL = frozenset(("accept", "reject"))
_NO_VALUE = frozenset(("accept", "reject", "copy", "regenerate"))

# Floats need no allow_inf_nan check: msgspec rejects NaN/Infinity literals and numbers
# that overflow a double, so every float it returns is finite.


class FastSamplingParams(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """Mirror of `schemas.events.SamplingParams`."""

    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=10.0)] = 1.0
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] = 1.0
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=ev.MAX_TOKENS)] = 256
    seed: int | None = None


class FastGeneration(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """Mirror of `schemas.events.GenerationEvent` (a sample's source)."""

    generation_id: Id
    model: Id
    policy_version: NonNegInt
    prompt: Text
    completion: Text
    prompt_token_ids: TokenIds
    completion_token_ids: TokenIds
    completion_logprobs: Logprobs
    user_id: Id
    schema_version: Literal[1] = 1
    event_id: Id = msgspec.field(default_factory=ev.new_event_id)
    event_time_ms: TimeMs = msgspec.field(default_factory=ev.now_ms)
    tenant_id: Id = "default"
    sampling: FastSamplingParams = msgspec.field(default_factory=FastSamplingParams)
    finish_reason: Literal["stop", "length"] = "stop"
    session_id: Id | None = None
    replica_id: Id | None = None
    latency_ms: Annotated[float, msgspec.Meta(ge=0.0, le=1e8)] | None = None

    def __post_init__(self) -> None:
        if len(self.completion_logprobs) != len(self.completion_token_ids):
            raise ValueError("completion_logprobs: length differs from completion_token_ids")


class FastFeedback(msgspec.Struct, forbid_unknown_fields=True, frozen=True, gc=False):
    """Mirror of `schemas.events.FeedbackEvent`."""

    generation_id: Id
    kind: FeedbackKindName
    user_id: Id
    schema_version: Literal[1] = 1
    event_id: Id = msgspec.field(default_factory=ev.new_event_id)
    event_time_ms: TimeMs = msgspec.field(default_factory=ev.now_ms)
    tenant_id: Id = "default"
    value: float | None = None
    edited_text: Text | None = None
    final: bool = False
    session_id: Id | None = None

    def __post_init__(self) -> None:
        # The rules of FeedbackEvent._value_fits_kind, in the same order.
        kind, value = self.kind, self.value
        if kind == "thumb":
            ok = value == 1.0 or value == -1.0
        elif kind == "rating":
            ok = value is not None and 1.0 <= value <= 5.0
        elif kind == "dwell":
            ok = value is not None and 0.0 <= value <= 86_400.0
        else:
            ok = kind not in _NO_VALUE or value is None
        if not ok:
            raise ValueError("value: does not fit the kind")
        if kind == "edit":
            if self.edited_text is None:
                raise ValueError("edited_text: required for kind=edit")
        elif self.edited_text is not None or self.final:
            raise ValueError("edited_text: only kind=edit takes edited_text or final")

    @property
    def is_terminal(self) -> bool:
        """Whether this signal settles the reward at once (accept, reject, final edit)."""
        return self.kind in _TERMINAL or (self.kind == "edit" and self.final)


Generation = FastGeneration | ev.GenerationEvent
"""A decoded generation: the Struct, or the pydantic model for input only lax mode accepts."""
Feedback = FastFeedback | ev.FeedbackEvent
"""A decoded feedback event: the Struct, or the pydantic model for input only lax mode accepts."""

_gen_decoder = msgspec.json.Decoder(FastGeneration)
_fb_decoder = msgspec.json.Decoder(FastFeedback)
GENERATION_DECODER = _gen_decoder
"""The strict fast path for callers that inline it (the join's loop): `.decode(raw)`
raises `FAST_ERRORS` where `decode_generation` would ask pydantic."""
FEEDBACK_DECODER = _fb_decoder
"""As `GENERATION_DECODER`, for feedback."""
FAST_ERRORS = (msgspec.DecodeError, RecursionError)


def fast_generation(raw: bytes) -> FastGeneration | None:
    """The strict fast path alone: the Struct, or None when it refuses the input."""
    try:
        return _gen_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def fast_feedback(raw: bytes) -> FastFeedback | None:
    """The strict fast path alone: the Struct, or None when it refuses the input."""
    try:
        return _fb_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None


def decode_generation(raw: bytes) -> Generation:
    """Decode and validate a generations.v1 value exactly as `decode(GenerationEvent, raw)`
    does (same verdict, same `InvalidEvent`), fast for the valid case."""
    if len(raw) <= MAX_MESSAGE_BYTES:
        try:
            return _gen_decoder.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            pass
    return _pydantic(ev.GenerationEvent, raw)


def decode_feedback(raw: bytes) -> Feedback:
    """Decode and validate a feedback.v1 value exactly as `decode(FeedbackEvent, raw)`
    does (same verdict, same `InvalidEvent`), fast for the valid case."""
    if len(raw) <= MAX_MESSAGE_BYTES:
        try:
            return _fb_decoder.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            pass
    return _pydantic(ev.FeedbackEvent, raw)


def _pydantic(model: type[ev.GenerationEvent] | type[ev.FeedbackEvent], raw: bytes):
    """The verdict of the contract (raises `InvalidEvent` naming the field)."""
    if len(raw) <= MAX_MESSAGE_BYTES:
        try:
            # pydantic's JSON mode accepts a few inputs its Python mode refuses, and the
            # other way round; the join has always accepted either.
            return model.model_validate_json(raw)
        except Exception:  # decode() below gives the verdict and names the field
            pass
    return decode(model, raw)


__all__ = [
    "FAST_ERRORS",
    "FEEDBACK_DECODER",
    "GENERATION_DECODER",
    "FastFeedback",
    "FastGeneration",
    "FastSamplingParams",
    "Feedback",
    "Generation",
    "InvalidEvent",
    "decode_feedback",
    "decode_generation",
    "fast_feedback",
    "fast_generation",
]
