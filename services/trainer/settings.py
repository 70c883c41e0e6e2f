"""The one settings model of the trainer (`RLFEED_` environment variables)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from services.config import RlfeedSettings, StoreLocation


class TrainerSettings(RlfeedSettings):
    """`rlfeed train`: online policy gradient on samples.v1, gated publishing."""

    # --- model and store ---
    model_name: str = "smollm2-135m-instruct"
    """Name of the policy (the key of model-updates.v1; samples of other models are skipped)."""
    model_dir: Path | None = None
    """HF model directory of version 0; unset: `default_model_dir` (`rlfeed model build`)."""
    checkpoint_dir: StoreLocation | None = None
    """Root of the checkpoint store that replicas read (the same setting as theirs): a
    directory or an fsspec URL (`s3://bucket/prefix` with the checkpoint_s3_* settings);
    unset: `<home_dir>/checkpoints`."""
    trainer_state_dir: Path | None = None
    """Where the trainer's own resumable checkpoints go; unset: `<home_dir>/trainer`."""
    trainer_group_id: str = "rlfeed-trainer"
    """Consumer group id (required by the client; offsets are never committed to it:
    the trainer's checkpoint owns them)."""
    trainer_start_from: str = Field("earliest", pattern="^(earliest|latest)$")
    """Where a trainer without a checkpoint starts reading samples.v1."""

    # --- optimisation ---
    lr: float = Field(5e-5, gt=0)
    """AdamW learning rate (5e-5 learns a simple preference in minutes on SmolLM2-135M)."""
    adam_betas: tuple[float, float] = (0.9, 0.99)
    """AdamW betas."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    grad_clip_norm: float = Field(1.0, gt=0)
    """Global gradient norm clip."""
    trainer_batch_size: int = Field(32, ge=1)
    """Samples consumed per optimiser step (before dropping zero-advantage ones)."""
    trainer_micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward; gradients accumulate over the step."""
    trainer_batch_wait_s: float = Field(2.0, gt=0)
    """Longest a partly filled batch waits for more samples before it is trained."""
    max_seq_tokens: int = Field(1024, ge=8)
    """Prompt + completion tokens kept per sample (the completion's tail is cut)."""
    kl_coef: float = Field(0.05, ge=0)
    """Weight of the KL penalty to the reference model (version 0); 0 skips the reference."""
    truncate_ratio_max: float = Field(2.0, gt=0)
    """Cap of the per-token importance ratio pi_trainer / pi_sampler (truncated IS)."""
    max_staleness_versions: int = Field(4, ge=0)
    """Samples from a policy more than this many versions behind the latest published
    one are dropped (and counted)."""
    baseline_decay: float = Field(0.99, ge=0, lt=1)
    """Per-sample decay of the running reward baseline used for prompts seen once."""
    trainer_torch_threads: int = Field(1, ge=1)
    """torch intra-op threads of the trainer (it shares the cores with the replicas,
    whose own knob is `torch_threads`)."""
    pipelined: bool = True
    """Read, decode, batch and compute the frozen reference's logprobs (the KL term:
    forward only) in a background thread while the optimiser runs the policy's
    forward/backward. That thread uses `trainer_torch_threads` intra-op threads too."""
    trainer_device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    """Where the policy and the reference model live: `auto` is cuda when torch sees a
    GPU, else cpu; `cpu`, `cuda` or `cuda:N` force it."""
    trainer_bf16: bool | None = None
    """bf16 autocast of the forward/backward passes (fp32 master weights and optimiser
    state either way; published weights stay fp32). None: on for cuda, off for cpu
    (measured slower on CPUs without native bf16, see bench/trainer.py)."""
    follow_rollbacks: bool = True
    """Watch model-updates.v1 (`rollback: true`) and rollouts.v1 (`decision: rollback`):
    when the version the trainer builds on is abandoned, reload the version now served
    and publish its children from then on."""
    trainer_dist_timeout_s: float = Field(86_400.0, gt=0)
    """Data-parallel runs (torchrun, WORLD_SIZE > 1): longest one collective may wait. The
    other ranks wait in a broadcast while rank 0 waits for samples, gates or checkpoints,
    so it is long; a crashed rank is caught by torchrun, not by this timeout."""
    trainer_latency_window: int = Field(10_000, ge=1)
    """Most recent trained samples whose feedback-to-training latency is kept for the
    p50/p99 figures logged at stop."""
    seed: int = 0
    """Seed of torch's generator (gate sampling)."""

    # --- checkpoints ---
    checkpoint_every_steps: int = Field(50, ge=1)
    """Write a resumable checkpoint (weights, optimiser, offsets) every N steps."""
    checkpoint_every_s: float = Field(600.0, gt=0)
    """... or after this many seconds since the last one, whichever comes first."""
    checkpoints_kept: int = Field(2, ge=1)
    """Resumable checkpoints kept on disk."""

    # --- publishing ---
    publish_every_steps: int = Field(0, ge=0)
    """Try to publish a version every N steps (0: off)."""
    publish_every_samples: int = Field(0, ge=0)
    """... or every M samples trained (0: off)."""
    publish_every_s: float = Field(3 * 3600.0, ge=0)
    """... or every T seconds (0: off). Production default: every 3 hours."""
    full_snapshot_every_versions: int = Field(10, ge=1)
    """Every K-th version ships as a full snapshot; the others as deltas."""
    publish_in_background: bool = True
    """Gate and publish a copy of the weights on a thread of their own while the optimiser
    keeps stepping; off: the step that made the publish due waits for it."""

    # --- eval gate ---
    gate_enabled: bool = True
    """Off: every cadence tick publishes (tests and experiments only)."""
    heldout_every: int = Field(20, ge=2)
    """One sample in N (by generation_id hash) is held out of training for the gate."""
    gate_heldout_samples: int = Field(64, ge=1)
    """Most recent held-out samples kept for the gate."""
    gate_min_heldout: int = Field(8, ge=1)
    """Fewer held-out samples than this: the gate refuses (nothing to judge on)."""
    gate_prompts: int = Field(16, ge=1)
    """Held-out prompts the candidate generates on."""
    gate_max_new_tokens: int = Field(48, ge=1)
    """Tokens generated per gate prompt."""
    gate_temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the gate's generations."""
    gate_reward_drop_max: float = Field(0.1, ge=0)
    """Refuse when the candidate's importance-weighted held-out reward falls more than
    this below the held-out samples' mean reward (or `gate_reward_drop_se` standard
    errors, whichever is larger)."""
    gate_reward_drop_se: float = Field(2.0, ge=0)
    """The reward bound in standard errors of the candidate's reward estimate."""
    gate_kl_parent_max: float = Field(0.5, gt=0)
    """Refuse when KL(candidate || parent) per token on the gate's generations exceeds this."""
    gate_min_mean_tokens: float = Field(2.0, ge=0)
    """Refuse when the generations' mean length (tokens) is below this."""
    gate_min_length_ratio: float = Field(0.25, ge=0)
    """Refuse when the mean generated length falls below this fraction of the parent's
    on the same prompts."""
    gate_max_empty_frac: float = Field(0.25, ge=0, le=1)
    """Refuse when more than this fraction of generations is empty (or the parent's
    fraction plus `gate_max_rise_frac`, if higher)."""
    gate_max_truncated_frac: float = Field(0.5, ge=0, le=1)
    """Refuse when more than this fraction of generations hits gate_max_new_tokens (or the
    parent's fraction plus `gate_max_rise_frac`, if higher)."""
    gate_max_rise_frac: float = Field(0.25, ge=0, le=1)
    """Largest rise of the empty or truncated fraction over the parent's that ships."""
    gate_rm_min_user_auroc: float = Field(0.55, ge=0, le=1)
    """Refuse when the reward model's scores rank held-out samples users liked above the
    ones they disliked less often than this (AUROC; 0.5 is no agreement)."""
    gate_rm_min_samples: int = Field(30, ge=1)
    """Held-out samples with both a reward-model score and a user verdict needed before
    the reward-model guard may refuse."""
    gate_min_distinct_frac: float = Field(0.5, ge=0, le=1)
    """Refuse when distinct completions / prompts falls below this (one repeated answer)."""
    gate_min_distinct2: float = Field(0.2, ge=0, le=1)
    """Refuse when distinct token bigrams / all bigrams falls below this (repetition)."""

    @model_validator(mode="after")
    def _defaults_under_home(self) -> TrainerSettings:
        if self.model_dir is None:
            self.model_dir = self.default_model_dir
        if self.checkpoint_dir is None:
            self.checkpoint_dir = str(self.home_dir / "checkpoints")
        if self.trainer_state_dir is None:
            self.trainer_state_dir = self.home_dir / "trainer"
        if self.trainer_micro_batch_size > self.trainer_batch_size:
            self.trainer_micro_batch_size = self.trainer_batch_size
        return self
