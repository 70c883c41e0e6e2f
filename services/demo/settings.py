"""Settings of the demo process (it also runs the simulated users)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.simulator.settings import SimulatorSettings


class DemoSettings(SimulatorSettings):
    """`rlfeed demo`. Env prefix `RLFEED_`; every child process gets its settings from it."""

    demo_duration_s: float = 0.0
    """Stop after the users have been active this long; 0 runs until Ctrl-C."""
    demo_replicas: int = 2
    """Serving replicas to start."""
    demo_first_port: int = 8101
    """Port of the first replica; the others follow."""
    demo_embedded_kafka_port: int = 19092
    """Port of the embedded broker the demo starts."""
    demo_progress_interval_s: float = 15.0
    """How often a progress line is printed."""
    demo_startup_timeout_s: float = 300.0
    """Longest a child may take to become ready."""
    demo_settle_window_s: float = 8.0
    """The stream join's settle window in the demo (short, so rewards flow quickly)."""
    demo_publish_every_steps: int = 4
    """The trainer publishes (through its gate) every this many optimiser steps."""
    demo_trainer_batch_size: int = 32
    """Samples per optimiser step in the demo."""
    demo_heldout_every: int = 8
    """The trainer holds out every Nth sample for its gate (more often than in production,
    so the first version can be judged within minutes)."""
    demo_infra_nice: int = Field(10, ge=0, le=19)
    """CPU priority increment (nice) of the stack (broker, sink, dashboard) and the stream
    worker, so the replicas and the trainer get the cores first."""
    demo_trainer_stop_grace_s: float = 180.0
    """How long the trainer may take to write its shutdown checkpoint (weights and AdamW
    state of the 135M model are ~1.6 GB) before it is killed."""
    demo_drain_timeout_s: float = 60.0
    """At the end, how long the stream worker may take to consume the last events before
    the counts are taken anyway (the report says whether it drained)."""
    demo_report_min_answers: int = 30
    """The report's "last version" is the newest one users saw at least this many times,
    so its accept rate has a usable interval."""
    demo_rollout_enabled: bool = True
    """Canary rollouts (streams/rollout.py): each published version first serves a sticky
    slice of the users, and the stream worker promotes or rolls it back from their
    feedback (and the guardrails); the dashboard's arms panel shows it. Off: every
    published version is served to everyone at once."""
    demo_rollout_traffic_frac: float = Field(0.5, gt=0, le=1)
    """The candidate's share of the users in the demo (large, so it is judged within minutes
    at the demo's ~1 answer/s; half is also the split that compares two arms best for a
    given budget: bench/rollout.py --demo --traffic 0.7 is worse on both error rates)."""
    demo_rollout_min_samples_per_arm: int = Field(20, ge=1)
    """Samples each arm needs before the reward test may decide."""
    demo_rollout_max_samples: int = Field(100, ge=2)
    """The decision budget (samples of both arms, counted from when the candidate serves):
    once spent, a candidate at least as good as stable is promoted (`promote_if_not_worse`),
    a worse one rolled back. At the demo's ~0.8 samples/s the always-valid test almost never
    decides before it, so this is the rollout's length: ~2 minutes plus the candidate's
    load, shorter than the trainer's publish interval (at least publish_every_steps x
    trainer_batch_size / (1 - 1/heldout_every) = 146 samples, ~3 minutes), so a new
    version rarely waits in the rollout queue. 200 (the earlier default) took ~4 minutes
    plus the load, longer than that interval: versions queued (a 17-minute real-model run:
    publish-to-serving p50 262 s). The price, from bench/rollout.py --demo --sims 2000
    (stable 0.3): a 20% worse candidate is promoted 26% of the time instead of 16%, a 20%
    better one 74% instead of 82%."""
    sim_concurrency: int = 24
    """Requests in flight at once: enough for batches of ~12 per replica, where CPU
    generation is several times more efficient than one by one."""
    demo_model_dir: Path | None = None
    """The policy model; unset: `<home_dir>/models/smollm2-135m-instruct` (built if missing)."""
