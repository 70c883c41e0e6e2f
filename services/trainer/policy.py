"""The policy model as the trainer uses it: load, per-token logprobs, weights in the
checkpoint format (tied tensors once, as `save_pretrained` writes them)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase


def load(model_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """An fp32 model and its tokenizer from an HF directory."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model, tokenizer


def resolve_device(setting: str, cuda_available: bool) -> torch.device:
    """The device of the `trainer_device` setting: `auto` is cuda when available, else cpu;
    an explicit cuda device without a GPU is an error naming the setting."""
    if setting == "auto":
        return torch.device("cuda" if cuda_available else "cpu")
    if setting.startswith("cuda") and not cuda_available:
        raise ValueError(f"trainer_device={setting!r} but torch sees no CUDA device")
    return torch.device(setting)


def use_bf16(setting: bool | None, device: torch.device) -> bool:
    """Whether forward/backward run under bf16 autocast (`trainer_bf16`; None: on cuda only)."""
    return device.type == "cuda" if setting is None else setting


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `bf16`, else nothing."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's parameters are."""
    return next(model.parameters()).device


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
    """A detached copy of `weights(model)`, on the CPU (the store's and the codec's side)."""
    return {k: v.to("cpu", copy=True) for k, v in weights(model).items()}


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
    clone.to(device_of(model))
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
    """log p(token j+1 | tokens <= j) for every position j: shape (B, L-1), on the device
    of the inputs (they are moved to the model's device for the forward).

    With `mask` (B, L-1), only the masked positions go through the output layer (the
    vocabulary-sized logits dominate memory); the others are 0."""
    if mask is None:
        mask = attention_mask[:, 1:].float()
    home, dev = input_ids.device, device_of(model)
    input_ids, attention_mask, sel = input_ids.to(dev), attention_mask.to(dev), mask.to(dev).bool()
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    logits = model.get_output_embeddings()(hidden.last_hidden_state[:, :-1][sel]).float()
    out = torch.zeros(sel.shape, dtype=logits.dtype, device=dev)
    out[sel] = -F.cross_entropy(logits, input_ids[:, 1:][sel], reduction="none")
    return out.to(home)
