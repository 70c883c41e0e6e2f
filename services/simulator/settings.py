"""Settings of the simulated user population."""

from __future__ import annotations

from services.config import RlfeedSettings


class SimulatorSettings(RlfeedSettings):
    """Simulated users. Env prefix `RLFEED_`."""

    sim_preference: str = "services.simulator.preference:concise"
    """The users' hidden preference, `MODULE:CALLABLE` -> P(accept) in [0, 1]."""
    sim_replica_urls: tuple[str, ...] = ("http://127.0.0.1:8101",)
    """Base URLs of the serving replicas (the OpenAI API lives under /v1)."""
    sim_model_name: str = "smollm2-135m-instruct"
    """Model name sent in requests."""
    sim_users: int = 50
    """Size of the user population."""
    sim_concurrency: int = 8
    """Requests in flight at once across all users."""
    sim_silent_share: float = 0.15
    """Share of users who never give feedback."""
    sim_duplicate_rate: float = 0.05
    """Probability that a user's client sends one of its events twice."""
    sim_feedback_delay_max_s: float = 3.0
    """Feedback arrives up to this long after the answer (so events interleave)."""
    sim_max_tokens: int = 48
    """max_tokens of each request."""
    sim_temperature: float = 1.0
    """Sampling temperature of each request."""
    sim_seed: int = 0
    """Seed of the population and of its choices."""
