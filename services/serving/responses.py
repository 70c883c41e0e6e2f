"""OpenAI response bodies and stream chunks (pure functions over a finished or running job).

Every body and every chunk carries `generation_id` (the id feedback attaches to),
`policy_version` (the weights that produced it) and `replica_id`, as extra top-level
fields the official clients keep in `model_extra`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.serving.engines.base import TokenLogprob

Decode1 = Callable[[int], str]


@dataclass(frozen=True)
class Meta:
    """What identifies one response."""

    generation_id: str
    model: str
    created: int
    replica_id: str
    policy_version: int | None = None

    def extra(self) -> dict[str, Any]:
        return {
            "generation_id": self.generation_id,
            "policy_version": self.policy_version,
            "replica_id": self.replica_id,
        }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def api_finish_reason(reason: str | None) -> str | None:
    """The OpenAI finish_reason for an engine's (`abort` is not one of OpenAI's)."""
    return None if reason is None else ("length" if reason == "length" else "stop")


def chat_logprobs(tokens: Sequence[TokenLogprob], decode1: Decode1) -> dict[str, Any]:
    """`choices[].logprobs` of a chat completion."""

    def entry(tid: int, lp: float) -> dict[str, Any]:
        s = decode1(tid)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {
        "content": [
            {**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in tokens
        ],
        "refusal": None,
    }


def completion_logprobs(tokens: Sequence[TokenLogprob], decode1: Decode1, offset: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of a (legacy) completion; `offset` is the text already sent."""
    strings = [decode1(t.token_id) for t in tokens]
    offsets, pos = [], offset
    for s in strings:
        offsets.append(pos)
        pos += len(s)
    return {
        "tokens": strings,
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{decode1(i): lp for i, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }


def chat_body(
    meta: Meta,
    text: str,
    finish_reason: str | None,
    tokens: Sequence[TokenLogprob] | None,
    decode1: Decode1,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A non-streamed chat completion; `tokens` given: with logprobs."""
    return {
        "id": f"chatcmpl-{meta.generation_id}",
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": f"v{meta.policy_version}",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": api_finish_reason(finish_reason),
                "logprobs": None if tokens is None else chat_logprobs(tokens, decode1),
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        **meta.extra(),
    }


def completion_body(
    meta: Meta,
    text: str,
    finish_reason: str | None,
    tokens: Sequence[TokenLogprob] | None,
    decode1: Decode1,
    prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A non-streamed completion; `tokens` given: with logprobs."""
    return {
        "id": f"cmpl-{meta.generation_id}",
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": f"v{meta.policy_version}",
        "choices": [
            {
                "index": 0,
                "text": text,
                "finish_reason": api_finish_reason(finish_reason),
                "logprobs": None if tokens is None else completion_logprobs(tokens, decode1),
            }
        ],
        "usage": usage(prompt_tokens, completion_tokens),
        **meta.extra(),
    }


def chat_chunk(
    meta: Meta,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    usage_: dict[str, int] | None = None,
    empty_choices: bool = False,
) -> dict[str, Any]:
    """One `chat.completion.chunk`."""
    choices = (
        []
        if empty_choices
        else [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": api_finish_reason(finish_reason)}]
    )
    return {
        "id": f"chatcmpl-{meta.generation_id}",
        "object": "chat.completion.chunk",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": f"v{meta.policy_version}",
        "choices": choices,
        "usage": usage_,
        **meta.extra(),
    }


def completion_chunk(
    meta: Meta,
    text: str,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    usage_: dict[str, int] | None = None,
    empty_choices: bool = False,
) -> dict[str, Any]:
    """One streamed `text_completion` chunk."""
    choices = (
        []
        if empty_choices
        else [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": api_finish_reason(finish_reason)}]
    )
    return {
        "id": f"cmpl-{meta.generation_id}",
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": f"v{meta.policy_version}",
        "choices": choices,
        "usage": usage_,
        **meta.extra(),
    }
