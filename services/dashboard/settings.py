"""Settings of the dashboard, the consumer-lag probe and the alert loop (stack process)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from services.config import RlfeedSettings


class DashboardSettings(RlfeedSettings):
    """The operator page and its alerts. Env prefix `RLFEED_`."""

    dashboard_enabled: bool = True
    """Serve the dashboard page and run the lag/alert loop inside `rlfeed up`."""
    dashboard_host: str = "127.0.0.1"
    """Interface the dashboard binds to (loopback: the page has no authentication)."""
    dashboard_port: int = Field(8765, ge=0, le=65535)
    """TCP port of the dashboard page (0: any free port)."""
    keys_file: Path | None = None
    """JSON file of hashed API keys (`rlfeed keys create`; the gateway's RLFEED_KEYS_FILE);
    unset: home_dir/gateway-keys.json. Once it holds a key, the data endpoints
    (/api/panels, /api/alerts, /api/forget) require one, and a tenant's key sees only that
    tenant's rows."""
    dashboard_operator_tenant: str = "operator"
    """Keys of this tenant (`rlfeed keys create --tenant operator`) are operator keys: they
    see every tenant, the infrastructure panels and the alerts, and may call /api/forget."""
    dashboard_window_s: int = Field(3600, gt=0)
    """How far back the page's charts look, in seconds."""
    dashboard_refresh_s: float = Field(5.0, gt=0)
    """How often the page re-reads /api/panels, in seconds."""
    alert_interval_s: float = Field(10.0, gt=0)
    """How often consumer lag is probed and the alert rules run, in seconds."""
    lag_groups: list[str] = Field(default_factory=lambda: ["rlfeed-sink", "rlfeed-streams", "rlfeed-trainer"])
    """Consumer groups whose lag is probed (a group with no committed offset is skipped)."""
    lag_alert_max_messages: int = Field(10_000, ge=0)
    """Alert when a group's summed lag on one topic exceeds this many messages."""
    reward_alert_t: float = Field(3.0, gt=0)
    """Alert when Welch's t of (version reward - parent reward) is at or below minus this
    (one-sided p ≈ 0.0013 at 3.0 for the sample sizes the rule requires)."""
    reward_alert_min_samples: int = Field(30, ge=2)
    """Samples each of a version and its parent needs before the reward rule judges it."""
    kl_alert_max: float = Field(0.5, gt=0)
    """Alert when a published version's kl_parent (eval_metrics) exceeds this."""
    kl_spike_factor: float = Field(3.0, gt=1)
    """Alert when kl_parent exceeds this multiple of the median of the previous versions'."""
    kl_spike_floor: float = Field(0.02, ge=0)
    """kl_parent below this never counts as a spike, whatever the factor says."""
    kl_spike_history: int = Field(5, ge=1)
    """How many previous versions the KL median looks at."""
    dlq_window_s: int = Field(300, gt=0)
    """Dead letters are counted over this recent window, in seconds."""
    dlq_baseline_s: int = Field(3600, gt=0)
    """The window before dlq_window_s whose rate is the dead-letter baseline, in seconds."""
    dlq_alert_min_letters: int = Field(20, ge=1)
    """Fewest dead letters in dlq_window_s that can make a spike."""
    dlq_spike_factor: float = Field(5.0, gt=1)
    """Alert when the recent dead-letter rate is this multiple of the baseline rate."""
    replica_stuck_after_s: float = Field(120.0, ge=0)
    """Alert when a live replica still serves an older version this long after the newest
    version (or rollback) was published, in seconds."""
    replica_live_s: float = Field(600.0, gt=0)
    """A replica whose last status is older than this (seconds) counts as gone, not stuck."""
    replica_drop_window_s: int = Field(600, gt=0)
    """How far back (seconds) the `replica_dropping_events` alert compares a replica's
    lost-event counts."""
    replica_drop_alert_min_events: int = Field(1, ge=1)
    """Alert when a replica lost at least this many events within `replica_drop_window_s`."""
