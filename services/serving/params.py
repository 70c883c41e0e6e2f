"""OpenAI request bodies → validated generation parameters (pure, no torch).

Parsing is strict about what changes the output (a field we cannot honour is an error
that names it) and lenient about the rest (unknown fields are ignored, as OpenAI-
compatible servers do, so new client versions keep working).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from services.serving.errors import ApiError


@dataclass(frozen=True)
class Limits:
    """What the replica accepts, from its settings and model."""

    max_model_len_tokens: int
    default_max_tokens: int
    max_top_logprobs: int = 5
    max_stop_sequences: int = 4


@dataclass(frozen=True)
class GenParams:
    """Everything an engine needs to sample one completion."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    """How many alternatives to return per token (0: none)."""
    want_logprobs: bool = False
    """Whether the response shows logprobs (events always carry the sampled ones)."""


Float = Annotated[float, Field(allow_inf_nan=False)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: Annotated[Float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1)] | None = None
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    logit_bias: dict[str, Float] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatRequest(_Request):
    """`POST /v1/chat/completions` body (the fields we read)."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = False
    top_logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Request):
    """`POST /v1/completions` body (the fields we read)."""

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: Annotated[StrictInt, Field(ge=0)] | None = None
    echo: StrictBool | None = False
    suffix: str | None = None
    best_of: StrictInt | None = None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list"})


def _param(loc: tuple[Any, ...]) -> str | None:
    """The dotted field name of an error location, without pydantic's union member tags
    (`str`, `list[TextPart]`), which name a type, not a field."""
    parts = [str(p) for p in loc if isinstance(p, int) or ("[" not in str(p) and str(p) not in _TYPE_TAGS)]
    return ".".join(parts) or None


def _parse(model: type[_Request], body: Any) -> Any:
    if not isinstance(body, dict):
        raise ApiError("request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        param = _param(tuple(err["loc"]))
        msg = err["msg"]
        raise ApiError(f"{param}: {msg}" if param else msg, param=param) from None


def parse_chat(body: Any) -> ChatRequest:
    """Validate a chat completions body, or raise ApiError naming the field."""
    req: ChatRequest = _parse(ChatRequest, body)
    for i, m in enumerate(req.messages):
        if m.role != "assistant" and m.content is None:
            raise ApiError(f"messages.{i}.content: required for role {m.role}", param=f"messages.{i}.content")
    if req.tools:
        raise ApiError("tools: tool calling is not supported by this server", param="tools")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise ApiError("response_format: only type=text is supported", param="response_format")
    return req


def parse_completion(body: Any) -> CompletionRequest:
    """Validate a completions body, or raise ApiError naming the field."""
    req: CompletionRequest = _parse(CompletionRequest, body)
    if req.echo:
        raise ApiError("echo: not supported", param="echo")
    if req.suffix:
        raise ApiError("suffix: not supported", param="suffix")
    if req.best_of not in (None, 1):
        raise ApiError("best_of: only 1 is supported", param="best_of")
    return req


def completion_prompt(req: CompletionRequest) -> str | list[int]:
    """The single prompt of a completions request: text or token ids."""
    p = req.prompt
    if isinstance(p, str):
        return p
    if not p:
        raise ApiError("prompt: must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        return list(p)  # type: ignore[arg-type]
    if len(p) != 1:
        raise ApiError("prompt: one prompt per request (send several requests; they are batched)", param="prompt")
    return p[0]  # type: ignore[return-value]


def message_text(content: str | list[TextPart] | None) -> str:
    """A message's content as one string (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


def gen_params(req: ChatRequest | CompletionRequest, prompt_tokens: int, limits: Limits) -> GenParams:
    """The sampling parameters of a validated request, checked against the limits."""
    if req.n not in (None, 1):
        raise ApiError("n: only n=1 is supported (send several requests; they are batched)", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0.0):
            raise ApiError(f"{name}: not supported (must be 0)", param=name)
    if req.logit_bias:
        raise ApiError("logit_bias: not supported", param="logit_bias")
    max_tokens, max_param = req.max_tokens, "max_tokens"
    if isinstance(req, ChatRequest) and req.max_completion_tokens is not None:
        max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
    room = limits.max_model_len_tokens - prompt_tokens
    if room < 1:
        prompt_param = "messages" if isinstance(req, ChatRequest) else "prompt"
        raise ApiError(
            f"{prompt_param}: the prompt has {prompt_tokens} tokens; this model takes at most "
            f"{limits.max_model_len_tokens} tokens in all",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, room)
    elif max_tokens > room:
        raise ApiError(
            f"{max_param}: {max_tokens} new tokens after a prompt of {prompt_tokens} exceed this model's "
            f"{limits.max_model_len_tokens} tokens",
            param=max_param,
            code="context_length_exceeded",
        )
    stop: tuple[str, ...] = ()
    if req.stop is not None:
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
        if len(stop) > limits.max_stop_sequences or any(not s for s in stop):
            raise ApiError(f"stop: at most {limits.max_stop_sequences} non-empty stop sequences", param="stop")
    if isinstance(req, ChatRequest):
        want = bool(req.logprobs)
        top = req.top_logprobs or 0
        if top and not want:
            raise ApiError("top_logprobs: requires logprobs=true", param="top_logprobs")
        top_param = "top_logprobs"
    else:
        want = req.logprobs is not None
        top = req.logprobs or 0
        top_param = "logprobs"
    if top > limits.max_top_logprobs:
        raise ApiError(f"{top_param}: at most {limits.max_top_logprobs}", param=top_param)
    return GenParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=stop,
        top_logprobs=top,
        want_logprobs=want,
    )


def include_usage(req: ChatRequest | CompletionRequest) -> bool:
    """Whether a streamed response ends with a usage chunk (`stream_options.include_usage`)."""
    return bool(req.stream_options and req.stream_options.get("include_usage"))
