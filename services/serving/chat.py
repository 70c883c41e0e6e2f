"""Chat templating: OpenAI messages → the prompt text and token ids the model sees."""

from __future__ import annotations

from typing import Any

from services.serving.errors import ApiError
from services.serving.params import Message, message_text


def to_template_messages(messages: list[Message]) -> list[dict[str, str]]:
    """OpenAI messages as the plain role/content dicts chat templates expect.

    `developer` is the newer name of `system`; text parts are joined.
    """
    out = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        out.append({"role": role, "content": message_text(m.content)})
    return out


def render_chat(tokenizer: Any, messages: list[Message]) -> str:
    """The prompt text for `messages`, ending with the assistant turn's header."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ApiError("messages: this model has no chat template; use /v1/completions", param="messages")
    try:
        return tokenizer.apply_chat_template(to_template_messages(messages), add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # a template may reject e.g. a role order
        raise ApiError(f"messages: the chat template rejected them: {exc}", param="messages") from None


def encode_prompt(tokenizer: Any, text: str, *, templated: bool) -> list[int]:
    """Token ids of a prompt: a templated chat prompt gets no extra special tokens, a raw
    completions prompt gets the tokenizer's usual ones (e.g. BOS), as vLLM does."""
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])
