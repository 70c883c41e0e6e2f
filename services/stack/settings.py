"""Settings of the embedded stack process (`rlfeed up`)."""

from __future__ import annotations

from services.dashboard.settings import DashboardSettings
from services.sink.settings import SinkSettings


class StackSettings(SinkSettings, DashboardSettings):
    """`rlfeed up`: broker + topics + ClickHouse + sink + dashboard. Env prefix `RLFEED_`."""

    embedded_kafka_port: int = 19092
    """Loopback port of the embedded broker (used when kafka_url is unset)."""
    status_interval_s: float = 15.0
    """How often the stack prints a status line and refreshes its state file."""
    startup_timeout_s: float = 30.0
    """Longest the broker may take to answer before `rlfeed up` gives up."""
