"""The one settings model of the streams worker (`RLFEED_` environment variables)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import orjson
from pydantic import Field, model_validator

from services.config import RlfeedSettings, StoreLocation


class StreamsSettings(RlfeedSettings):
    """Windows, caps, reward weights and client knobs of the join worker."""

    group_id: str = "rlfeed-streams"
    """Consumer group of the join (the Faust app id is `<topic_prefix><group_id>`)."""

    # --- windows (event time, with a wall-clock tick) ---
    settle_window_s: float = Field(30.0, gt=0)
    """A reward settles this long (event time) after the first feedback, unless a
    terminal signal (accept, reject, final edit) settles it earlier."""
    generation_ttl_s: float = Field(600.0, gt=0)
    """A generation with no feedback this long after it was generated expires: it is
    dropped, or settled with `ttl_implicit_reward` when that is set."""
    orphan_feedback_ttl_s: float = Field(600.0, gt=0)
    """Feedback whose generation has not arrived this long after the first such
    feedback is dead-lettered (reason `orphan feedback`)."""
    correction_window_s: float = Field(3600.0, ge=0)
    """How long a settled generation is remembered: feedback that arrives within it
    produces a correction sample; later feedback is dead-lettered (reason `late`)."""
    max_clock_skew_s: float = Field(300.0, gt=0)
    """Events stamped further than this in the future (wall clock) are dead-lettered,
    so that one bad clock cannot expire a whole partition."""
    tick_interval_s: float = Field(1.0, gt=0)
    """Wall-clock tick: how often an idle worker advances its partitions' event clocks."""

    # --- bounds (per partition) ---
    max_pending_generations: int = Field(50_000, ge=1)
    """Pending (unsettled) keys kept per partition; beyond it the oldest expires early."""
    max_settled_keys: int = Field(20_000, ge=0)
    """Settled keys remembered per partition for corrections; beyond it the oldest is forgotten."""
    max_feedback_per_generation: int = Field(64, ge=1)
    """Feedback events kept per generation; more are dead-lettered."""

    max_dead_letter_bytes: int = Field(900_000, ge=10_000)
    """Largest dead letter written; a bigger one keeps only the first bytes of the
    original (base64 grows it by 4/3, and brokers refuse messages over ~1 MB)."""

    # --- per-user cap ---
    user_cap_samples_per_window: int = Field(1000, ge=1)
    """Most samples one pseudonymous user may contribute per cap window (all partitions
    together; each of the P join partitions allows ceil(cap / P))."""
    user_cap_window_s: float = Field(3600.0, gt=0)
    """Length of the tumbling event-time window the user cap counts in."""

    # --- rewards ---
    ttl_implicit_reward: float | None = None
    """Reward of a generation that got no feedback before its TTL; unset: drop it."""
    accept_reward: float = 0.75
    """Implicit reward of an accept."""
    reject_reward: float = -0.25
    """Implicit reward of a reject."""
    copy_reward: float = 0.5
    """Implicit reward of a copy of the completion."""
    regenerate_reward: float = -0.5
    """Implicit reward of a regenerate (the user asked for another completion)."""
    dwell_saturation_s: float = Field(30.0, gt=0)
    """Dwell time (seconds) at which the dwell component reaches 1."""
    edit_similarity_max_chars: int = Field(20_000, ge=1)
    """Texts are cut to this many characters before the edit similarity is computed."""
    reward_weights: dict[str, float] = Field(
        default_factory=lambda: {
            "thumb": 1.0,
            "rating": 1.0,
            "accept": 1.0,
            "reject": 1.0,
            "edit_similarity": 1.0,
            "copy": 1.0,
            "regenerate": 1.0,
            "dwell": 0.25,
            "ttl_implicit": 1.0,
        }
    )
    """Weight of each reward component in the composite reward (JSON in
    `RLFEED_REWARD_WEIGHTS`); a component missing here has weight 0."""
    reward_weights_file: Path | None = None
    """A JSON file `{"component": weight}` whose entries override `reward_weights`."""
    reward_clip: float = Field(10.0, gt=0)
    """The composite reward is clipped to [-reward_clip, +reward_clip]."""

    # --- preferences and the reward model (services/preferences/) ---
    preferences_enabled: bool = True
    """Mine user preferences from settled generations onto preferences.v1."""
    preference_pair_window_s: float = Field(3600.0, gt=0)
    """Two generations of one user and prompt are paired only when settled within this
    much event time of each other."""
    preference_max_keys: int = Field(100_000, ge=1)
    """(tenant, user, prompt) keys the worker remembers for pairing; beyond it the least
    recently used is forgotten (about 1 KB of text each, per remembered generation)."""
    preference_max_per_key: int = Field(4, ge=1)
    """Settled generations remembered per (tenant, user, prompt) key."""
    reward_model_enabled: bool = False
    """Score generations with the published reward model, off the hot path, and add its
    score to the reward as the `reward_model` component."""
    reward_model_weight: float = 0.5
    """Weight of the `reward_model` component in the composite reward."""
    reward_model_for: Literal["implicit", "all"] = "implicit"
    """Which samples get the component: `implicit`, those without a thumb, rating or edit
    (only implicit or no feedback); `all`, every sample."""
    reward_model_name: str = "rewardmodel-minilm"
    """Name of the reward model on model-updates.v1 and in the checkpoint store."""
    checkpoint_dir: StoreLocation | None = None
    """Root of the checkpoint store (the trainer's and replicas' setting): a directory or an
    fsspec URL (`s3://bucket/prefix`); unset: `<home_dir>/checkpoints`."""
    reward_model_batch_size: int = Field(64, ge=1)
    """Generations scored per forward pass."""
    reward_model_linger_s: float = Field(0.05, ge=0)
    """Longest the scorer waits for a batch to fill."""
    reward_model_queue_max: int = Field(20_000, ge=1)
    """Generations waiting for a score; beyond it new ones are not scored (counted as dropped)."""
    reward_model_max_scores: int = Field(200_000, ge=1)
    """Scores kept for settling (the oldest are forgotten; about 100 bytes each)."""
    reward_model_torch_threads: int = Field(1, ge=1)
    """torch threads of the scorer (it shares the cores with the join thread)."""

    # --- client ---
    batch_max_messages: int = Field(5000, ge=1)
    """Most messages one hot-path batch consumes."""
    batch_timeout_s: float = Field(0.2, gt=0)
    """How long one consume call waits for messages."""
    prefetch_batches: int = Field(4, ge=1)
    """How many batches librdkafka keeps fetched ahead of the join (`queued.min.messages` =
    this x batch_max_messages; its default, 100k messages, keeps a caught-up fetcher busy)."""
    fetch_queue_backoff_ms: int = Field(20, ge=0)
    """How long librdkafka's fetcher waits before fetching more once that many are queued."""
    group_instance_id: str | None = None
    """Static group membership (a stable per-worker name, e.g. the pod name): a worker
    restarted with the same id gets its partitions back at once, without waiting for
    the session of its dead predecessor to expire (noida-db never expired it here)."""
    session_timeout_s: float = Field(15.0, ge=1)
    """Consumer-group session timeout: how long a dead worker holds its partitions."""
    max_poll_interval_s: float = Field(60.0, ge=1)
    """Longest a batch (with its changelog restore) may take between two consume calls;
    also how long a rebalance waits for a member that stopped answering."""
    restore_timeout_s: float = Field(60.0, gt=0)
    """Longest a changelog restore of one assignment may take before the worker fails."""
    flush_timeout_s: float = Field(30.0, gt=0)
    """Longest the producer flush of one batch may take before the worker fails."""
    status_interval_s: float = Field(30.0, gt=0)
    """How often the worker logs its join counters (`streams.status`)."""
    streams_web_enabled: bool = True
    """Serve the Faust web view (`/streams/status`)."""
    streams_web_port: int = Field(6066, ge=0, le=65535)
    """Port of the web view (0: pick a free one)."""

    # --- canary rollouts (streams/rollout.py explains the test) ---
    rollout_enabled: bool = False
    """Decide canary rollouts: a published version becomes the candidate on rollouts.v1 and
    is promoted or rolled back from live reward. Serving reads the same
    `RLFEED_ROLLOUT_ENABLED`; off, replicas swap to every published version at once."""
    rollout_candidate_traffic_frac: float = Field(0.1, gt=0, le=1)
    """Share of users (sticky by user id) a new candidate serves."""
    rollout_promote_alpha: float = Field(0.05, gt=0, lt=1)
    """Bound on the probability of promoting a candidate that is not better (always valid)."""
    rollout_rollback_alpha: float = Field(0.05, gt=0, lt=1)
    """Bound on the probability of rolling back, on evidence, a candidate that is not worse."""
    rollout_mixture_tau: float = Field(0.08, gt=0)
    """Scale (in success-rate difference) of the mSPRT's normal mixture: the effect size the
    test is most sensitive to."""
    rollout_min_samples_per_arm: int = Field(30, ge=1)
    """No reward-based decision before each arm has this many samples (the variance
    plug-in needs a few)."""
    rollout_max_samples: int = Field(10_000, ge=2)
    """Budget: samples on both arms together after which a candidate without evidence of
    improvement is rolled back."""
    rollout_at_budget: Literal["rollback", "promote_if_not_worse"] = "rollback"
    """What a spent budget means: `rollback` (the default: a candidate without evidence of
    improvement goes), or `promote_if_not_worse` (it takes over when its observed success
    rate is at least stable's; for loops that publish faster than small improvements can
    be told apart, e.g. the demo)."""
    rollout_success_reward_min: float = 0.0
    """A sample is a success (the accept-like signal) when its reward is above this."""
    rollout_max_length_ratio: float = Field(2.0, gt=1)
    """Guardrail: roll back when the candidate's mean completion length (tokens) is more than
    this many times stable's, or less than its inverse."""
    rollout_guardrail_min_samples: int = Field(20, ge=1)
    """Samples each arm needs before the length guardrail is checked."""
    rollout_max_dead_letter_frac: float = Field(0.05, ge=0, le=1)
    """Guardrail: roll back when more than this share of the candidate's generations were dead-lettered."""
    rollout_min_dead_letters: int = Field(5, ge=1)
    """Dead letters of the candidate below which the dead-letter guardrail stays quiet."""
    rollout_max_error_frac: float = Field(0.05, ge=0, le=1)
    """Guardrail: roll back when the share of the candidate's requests that failed (as the
    replicas report on replica-status.v1) exceeds stable's share by more than this."""
    rollout_min_errors: int = Field(3, ge=1)
    """Failed requests of the candidate below which the error-rate guardrail stays quiet."""
    rollout_max_latency_p95_ratio: float = Field(2.0, gt=1)
    """Guardrail: roll back when the candidate's request latency p95 is above this many times
    stable's p95 plus `rollout_latency_p95_slack_ms` (both arms run on the same replicas)."""
    rollout_latency_p95_slack_ms: float = Field(250.0, ge=0)
    """Absolute slack (ms) added to the latency bound, so that noise on fast requests does not
    roll a candidate back."""
    rollout_latency_min_requests: int = Field(20, ge=1)
    """Answered requests each arm needs before the latency guardrail is checked."""
    rollout_decide_interval_s: float = Field(1.0, gt=0)
    """How often the rollout decision is evaluated (the test stays valid at any cadence)."""
    rollout_report_every_samples: int = Field(200, ge=1)
    """A collect event with the arms goes to rollouts.v1 after this many new samples."""

    @model_validator(mode="after")
    def _load_weights_file(self) -> StreamsSettings:
        if self.reward_weights_file is not None:
            extra = orjson.loads(Path(self.reward_weights_file).read_bytes())
            if not isinstance(extra, dict):
                raise ValueError("reward_weights_file: expected a JSON object of weights")
            self.reward_weights = {**self.reward_weights, **{str(k): float(v) for k, v in extra.items()}}
        from streams.rewards import REGISTRY

        unknown = sorted(set(self.reward_weights) - set(REGISTRY))
        if unknown:
            raise ValueError(f"reward_weights: unknown components {unknown}; known: {sorted(REGISTRY)}")
        return self
