"""The CPU engine: a transformers causal LM with a hand-written batched decoding loop.

`generate()` is not used because each row of a batch has its own temperature, top-p,
seed, stop sequences and length, and the replica needs the logprob of every sampled token
under its own sampling distribution as it streams. The loop is: left-pad the prompts,
prefill once with a KV cache (logits only for the last position), then one forward per
step for the whole batch; finished rows keep feeding a pad token until the batch ends.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from services.logs import event
from services.serving.batching import left_pad
from services.serving.engines.base import Engine, Job, TokenLogprob
from services.serving.engines.sampling import (
    gather_logprobs,
    make_generator,
    processed_logprobs,
    sample,
    top_logprobs,
)
from services.serving.settings import ServingSettings
from services.serving.weights import check_state_dict, first_non_finite

log = logging.getLogger(__name__)


class TransformersEngine(Engine):
    """Batched sampling with per-token logprobs on CPU (or any torch device)."""

    name = "transformers"

    def __init__(self, settings: ServingSettings, device: str = "cpu") -> None:
        super().__init__(
            model_name=settings.model_name,
            max_batch_size=settings.max_batch_size,
            batch_wait_ms=settings.batch_wait_ms,
        )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if settings.torch_threads > 0:
            torch.set_num_threads(settings.torch_threads)
        model_dir = Path(settings.resolved_model_dir)
        self._tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
        self.device = device
        self.candidate_model: Any = None
        """The rollout candidate's module while one is loaded."""
        self._active: Any = self.model
        """The module the running batch uses (set under the generation lock)."""
        cfg = self.model.config
        self._max_len = min(settings.max_model_len_tokens, int(getattr(cfg, "max_position_embeddings", 2048)))
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self._tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else list(eos or []))
        self.pad_id = (
            self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else next(iter(self.eos_ids))
        )
        # Bound the KV cache of one batch to what max_batch_size full-length rows would take.
        self.max_batch_tokens = settings.max_batch_size * self._max_len
        event(
            log,
            "engine_loaded",
            engine=self.name,
            model_dir=str(model_dir),
            max_model_len=self._max_len,
            parameters=sum(p.numel() for p in self.model.parameters()),
        )

    @property
    def generates_on_cpu(self) -> bool:
        return torch.device(self.device).type == "cpu"

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_len

    # --- weights -------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The served weights as the checkpoint store holds them: tied duplicates (the
        lm_head that shares the embedding) left out, as `save_pretrained` and the trainer
        do, so that checksums match and a delta applies to them directly."""
        tied = self._tied_names()
        return {k: v.detach() for k, v in self.model.state_dict().items() if k not in tied}

    def _tied_names(self) -> set[str]:
        """Names whose tensor shares storage with another name (tied embeddings)."""
        seen: dict[int, str] = {}
        tied: set[str] = set()
        for name, t in self.model.state_dict().items():
            ptr = t.data_ptr()
            if ptr in seen:
                tied.add(name)
            else:
                seen[ptr] = name
        return tied

    def _check_weights(self, state_dict: dict[str, Any]) -> None:
        current = {k: (tuple(v.shape), str(v.dtype)) for k, v in self.model.state_dict().items()}
        new = {k: (tuple(v.shape), str(v.dtype)) for k, v in state_dict.items()}
        check_state_dict(current, new, optional=self._tied_names())
        bad = first_non_finite(state_dict)
        if bad is not None:
            raise ValueError(f"{bad}: contains NaN or infinite values")

    def _load_weights(self, state_dict: dict[str, Any]) -> None:
        with torch.no_grad():
            self.model.load_state_dict(state_dict, strict=False)

    # --- canary candidate: a second copy of the module (135M params: ~0.5 GB in fp32) ---
    def _prepare_candidate(self, state_dict: dict[str, Any]) -> Any:
        import copy

        candidate = copy.deepcopy(self.model)  # keeps tied weights tied
        with torch.no_grad():
            candidate.load_state_dict(state_dict, strict=False)
        return candidate.eval()

    def _install_candidate(self, prepared: Any) -> None:
        self.candidate_model = prepared

    def _promote_candidate(self) -> None:
        self.model, self.candidate_model = self.candidate_model, None
        self._active = self.model

    def _use_candidate(self, on: bool) -> None:
        self._active = self.candidate_model if on and self.candidate_model is not None else self.model

    def candidate_state_dict(self) -> dict[str, torch.Tensor] | None:
        if self.candidate_model is None:
            return None
        tied = self._tied_names()
        return {k: v.detach() for k, v in self.candidate_model.state_dict().items() if k not in tied}

    # --- generation ----------------------------------------------------------------
    @torch.inference_mode()
    def _run_batch(self, batch: list[Job]) -> None:
        from transformers import DynamicCache

        ids, mask = left_pad([j.prompt_ids for j in batch], self.pad_id)
        input_ids = torch.tensor(ids, device=self.device)
        attention = torch.tensor(mask, device=self.device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        temps = [j.params.temperature for j in batch]
        top_ps = [j.params.top_p for j in batch]
        gens = [make_generator(j.params.seed) if j.params.temperature > 0 else None for j in batch]
        n_top = max(j.params.top_logprobs for j in batch)
        cache = DynamicCache()
        steps = max(j.max_tokens for j in batch)
        for _ in range(steps):
            out = self._active(
                input_ids=input_ids,
                attention_mask=attention,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            cache = out.past_key_values
            lp = processed_logprobs(out.logits[:, -1, :], temps, top_ps)
            tokens = sample(lp, temps, gens)
            picked = gather_logprobs(lp, tokens)
            tops = top_logprobs(lp, n_top)
            all_done = True
            for i, job in enumerate(batch):
                if job.done:
                    continue
                top = tuple(tops[i][: job.params.top_logprobs])
                if not job.add(TokenLogprob(tokens[i], picked[i], top), is_eos=tokens[i] in self.eos_ids):
                    all_done = False
            if all_done:
                return
            next_ids = [self.pad_id if j.done else t for j, t in zip(batch, tokens, strict=True)]
            input_ids = torch.tensor(next_ids, device=self.device)[:, None]
            attention = torch.cat([attention, attention.new_ones((len(batch), 1))], dim=-1)
            positions = positions[:, -1:] + 1
