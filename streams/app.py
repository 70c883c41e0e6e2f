"""The Faust app of a streams worker: lifecycle, low-rate agents, web view, the join service.

The app starts `JoinService` (the confluent-kafka hot path) with itself and stops it
when the worker stops. Low-rate topics go through ordinary Faust agents: the latest
model update and rollout per model are tracked for the status view; a timer logs the
join's counters. `GET /streams/status` returns the same as JSON.
"""

from __future__ import annotations

import logging
from typing import Any

import faust

from schemas.codec import InvalidEvent, decode
from schemas.events import ModelUpdateEvent, RolloutEvent
from schemas.topics import MODEL_UPDATES, ROLLOUTS
from services import logs
from streams.hot_path import JoinService
from streams.settings import StreamsSettings

log = logging.getLogger(__name__)


class StreamsApp(faust.App):
    """A Faust app that also holds the join service and the low-rate status."""

    join: JoinService
    model_versions: dict[str, int]
    rollouts: dict[str, dict[str, Any]]

    def status(self) -> dict[str, Any]:
        """What the worker is doing: the join's counters and the low-rate state."""
        core = self.join.core
        return {
            "join": core.status() if core is not None else {"starting": True},
            "model_versions": dict(self.model_versions),
            "rollouts": dict(self.rollouts),
        }


def create_app(settings: StreamsSettings, bootstrap: str) -> StreamsApp:
    """The worker's app, wired to `bootstrap` (`host:port,...`)."""
    prefix = settings.topic_prefix
    app = StreamsApp(
        f"{prefix}{settings.group_id}-app",
        broker=f"kafka://{bootstrap}",
        store="memory://",
        topic_partitions=1,
        web_enabled=settings.streams_web_enabled,
        web_port=settings.streams_web_port,
        web_bind="127.0.0.1",
        consumer_auto_offset_reset="latest",
    )
    app.model_versions = {}
    app.rollouts = {}
    app.join = JoinService(settings, bootstrap)
    app.add_dependency(app.join)

    model_updates = app.topic(MODEL_UPDATES.full_name(prefix), value_serializer="raw", key_serializer="raw")
    rollouts = app.topic(ROLLOUTS.full_name(prefix), value_serializer="raw", key_serializer="raw")

    @app.agent(model_updates)
    async def track_model_updates(stream: Any) -> None:
        async for raw in stream:
            try:
                update = decode(ModelUpdateEvent, raw)
            except InvalidEvent as err:
                logs.event(log, "streams.bad_model_update", level=logging.WARNING, reason=str(err)[:200])
                continue
            app.model_versions[update.model] = update.version

    @app.agent(rollouts)
    async def track_rollouts(stream: Any) -> None:
        async for raw in stream:
            try:
                rollout = decode(RolloutEvent, raw)
            except InvalidEvent as err:
                logs.event(log, "streams.bad_rollout", level=logging.WARNING, reason=str(err)[:200])
                continue
            app.rollouts[rollout.model] = {
                "stable_version": rollout.stable_version,
                "candidate_version": rollout.candidate_version,
                "decision": rollout.decision,
            }

    @app.timer(interval=settings.status_interval_s)
    async def log_status() -> None:
        logs.event(log, "streams.status", **app.status())

    @app.page("/streams/status")
    async def status_page(web: Any, request: Any) -> Any:
        return web.json(app.status())

    return app
