"""The settings base every process's settings model extends.

Each process has exactly one pydantic-settings model, read from environment variables
with the `RLFEED_` prefix (e.g. `RLFEED_KAFKA_URL`). Field docstrings are the docs.
"""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class RlfeedSettings(BaseSettings):
    """Where the shared infrastructure is. Unset URLs mean: use the embedded stack."""

    model_config = SettingsConfigDict(env_prefix="RLFEED_", extra="ignore", use_attribute_docstrings=True)

    kafka_url: str | None = None
    """`kafka://host:port[,host:port]` of a running broker; unset: the embedded broker."""
    clickhouse_url: str | None = None
    """`http(s)://user:pass@host:8123/db` or `chdb:///path`; unset: chdb under home_dir."""
    topic_prefix: str = ""
    """Prepended to every topic name, so several stacks can share one broker."""
    home_dir: Path = Path(".rlfeed")
    """Where the embedded stack keeps its data (broker log, chdb, models, checkpoints)."""
    log_level: str = "info"
    """Log level for the JSON log lines (debug, info, warning, error)."""

    @property
    def default_model_dir(self) -> Path:
        """Where `rlfeed model build` puts the policy model unless told otherwise."""
        return self.home_dir / "models" / "smollm2-135m-instruct"

    @property
    def embedded_clickhouse_url(self) -> str:
        """The chdb URL the embedded stack uses when clickhouse_url is unset."""
        return f"chdb://{(self.home_dir / 'clickhouse').resolve()}"
