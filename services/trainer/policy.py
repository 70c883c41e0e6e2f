"""The policy model as the trainer uses it: load, per-token logprobs, weights in the
checkpoint format (tied tensors once, as `save_pretrained` writes them)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def load(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An fp32 model and its tokenizer from an HF directory."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token id used for padding."""
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors by name, each storage once (the first name wins, so a tied
    lm_head is left out as in the saved checkpoint). Views, not copies."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        out[name] = t.detach()
    return out


def copy_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of `weights(model)`."""
    return {k: v.clone() for k, v in weights(model).items()}


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model in place (tied tensors follow their first name)."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = weights(model)
    absent = [k for k in missing if k in own]
    if absent or unexpected:
        raise ValueError(f"weights do not fit the model: missing {absent[:5]}, unexpected {unexpected[:5]}")


def frozen_copy(model: PreTrainedModel, state: dict[str, torch.Tensor] | None = None) -> PreTrainedModel:
    """A second instance of the architecture, in eval mode without gradients, holding
    `state` (default: the model's current weights)."""
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    if state is not None:
        load_weights(clone, state)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """log p(token j+1 | tokens <= j) for every position j: shape (B, L-1).

    With `mask` (B, L-1), only the masked positions go through the output layer (the
    vocabulary-sized logits dominate memory); the others are 0."""
    if mask is None:
        mask = attention_mask[:, 1:].float()
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    sel = mask.bool()
    logits = model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][sel]).float()
    out = torch.zeros(mask.shape, dtype=logits.dtype)
    out[sel] = -F.cross_entropy(logits, input_ids[:, 1:][sel], reduction="none")
    return out
