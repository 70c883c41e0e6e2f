"""The Faust app of a streams worker: lifecycle, low-rate agents, web view, the join service.

The app starts `JoinService` (the confluent-kafka hot path) with itself and stops it
when the worker stops. Low-rate topics go through ordinary Faust agents: the latest
model update and rollout per model are tracked for the status view; a timer logs the
join's counters. `GET /streams/status` returns the same as JSON.

With `rollout_enabled`, the canary decision (streams/rollout.py) runs here too, on
low-rate inputs only: model updates start or queue rollouts, samples.v1 and dlq.v1 feed
the arms' reward and dead letters, replica-status.v1 their requests, failures and
latencies (the replicas' per-version counters), a timer decides, and every decision goes to rollouts.v1, from which the
controller adopts the split again (its own events and operators' alike). On start it
rebuilds its state before it handles anything: each model's last rollouts.v1 event, then
the samples since the running rollout started (re-read by time; generation ids already
counted are skipped, so the overlap with the agent's committed offsets counts once).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import Any

import faust
import orjson

from schemas.codec import InvalidEvent, decode, encode
from schemas.events import (
    DeadLetterEvent,
    ModelUpdateEvent,
    ReplicaStatusEvent,
    RolloutEvent,
    SampleEvent,
    now_ms,
)
from schemas.topics import DLQ, GENERATIONS, MODEL_UPDATES, REPLICA_STATUS, ROLLOUTS, SAMPLES
from services import logs
from services.kafka.idle import pause_aiokafka_empty_fetches
from services.kafka.security import faust_credentials
from streams.hot_path import JoinService
from streams.rollout import RolloutController, policy_from_settings
from streams.settings import StreamsSettings

log = logging.getLogger(__name__)


class StreamsApp(faust.App):
    """A Faust app that also holds the join service and the low-rate status."""

    join: JoinService
    model_versions: dict[str, int]
    rollouts: dict[str, dict[str, Any]]
    rollout: RolloutController | None

    def status(self) -> dict[str, Any]:
        """What the worker is doing: the join's counters and the low-rate state."""
        core = self.join.core
        return {
            "join": core.status() if core is not None else {"starting": True},
            "model_versions": dict(self.model_versions),
            "rollouts": dict(self.rollouts),
            "rollout_decision": self.rollout.status() if self.rollout is not None else "disabled",
        }


def create_app(settings: StreamsSettings, bootstrap: str) -> StreamsApp:
    """The worker's app, wired to `bootstrap` (`host:port,...`)."""
    prefix = settings.topic_prefix
    pause_aiokafka_empty_fetches(settings.kafka_idle_pause_ms)  # Faust's consumer is aiokafka
    app = StreamsApp(
        f"{prefix}{settings.group_id}-app",
        broker=f"kafka://{bootstrap}",
        broker_credentials=faust_credentials(settings),
        store="memory://",
        datadir=str(settings.home_dir / "streams"),  # Faust's default is ./<app id>-data, in the cwd
        topic_partitions=1,
        web_enabled=settings.streams_web_enabled,
        web_port=settings.streams_web_port,
        web_bind="127.0.0.1",
        consumer_auto_offset_reset="latest",
    )
    app.model_versions = {}
    app.rollouts = {}
    app.rollout = None
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
            if app.rollout is not None:
                await rollout_ready.wait()
                await send_rollouts(app.rollout.on_model_update(update, now_ms()))
            app.join.follow_model_update(update.model, update.version)

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
            if app.rollout is not None:
                await rollout_ready.wait()
                if stream.current_event.message.offset > adopted_offsets.get(rollout.model, -1):
                    adopt(rollout)

    rollout_ready = asyncio.Event()
    adopted_offsets: dict[str, int] = {}
    """Offset of the last rollouts.v1 event the start-up catch-up adopted, per model."""

    async def send_rollouts(events: list[RolloutEvent]) -> None:
        for ev in events:
            await rollouts.send(key=ev.model.encode(), value=encode(ev))
            logs.event(
                log,
                "rollout_decision",
                model=ev.model,
                decision=str(ev.decision),
                stable=ev.stable_version,
                candidate=ev.candidate_version,
                decided=int(ev.arms.get("rollout.decided_version", -1)),
                reason=ev.reason[:300],
                stable_n=int(ev.arms.get("stable.n", 0)),
                candidate_n=int(ev.arms.get("candidate.n", 0)),
            )

    def adopt(ev: RolloutEvent) -> None:
        assert app.rollout is not None
        if app.rollout.adopt(ev):
            logs.event(log, "rollout_adopted", model=ev.model, stable=ev.stable_version, candidate=ev.candidate_version)

    if settings.rollout_enabled:
        _install_rollouts(app, settings, bootstrap, rollout_ready, adopted_offsets, send_rollouts, adopt)

    @app.timer(interval=settings.status_interval_s)
    async def log_status() -> None:
        logs.event(log, "streams.status", **app.status())

    @app.page("/streams/status")
    async def status_page(web: Any, request: Any) -> Any:
        return web.json(app.status())

    return app


def _install_rollouts(
    app: StreamsApp,
    settings: StreamsSettings,
    bootstrap: str,
    ready: asyncio.Event,
    adopted_offsets: dict[str, int],
    send_rollouts: Any,
    adopt: Any,
) -> None:
    """The canary decision's start-up catch-up, its sample and dead-letter agents, and its timer."""
    from services.rollout.control import read_latest, read_samples_since

    prefix = settings.topic_prefix
    controller = RolloutController(policy_from_settings(settings), settings.rollout_report_every_samples)
    app.rollout = controller
    samples = app.topic(SAMPLES.full_name(prefix), value_serializer="raw", key_serializer="raw")
    dead_letters = app.topic(DLQ.full_name(prefix), value_serializer="raw", key_serializer="raw")
    replica_status = app.topic(REPLICA_STATUS.full_name(prefix), value_serializer="raw", key_serializer="raw")

    @app.task
    async def rollout_catch_up() -> None:
        latest = await asyncio.to_thread(read_latest, bootstrap, ROLLOUTS.full_name(prefix))
        for model, (ev, offset) in latest.items():
            adopt(ev)
            adopted_offsets[model] = offset
        running = [r.started_ms for r in controller.rollouts.values() if r.candidate_version is not None]
        recounted = 0
        if running:
            past = await asyncio.to_thread(read_samples_since, bootstrap, SAMPLES.full_name(prefix), min(running))
            recounted = sum(controller.on_sample(s) for s in past)
        ready.set()
        logs.event(log, "rollout_ready", models=sorted(latest), samples_recounted=recounted)

    @app.agent(samples)
    async def count_samples(stream: Any) -> None:
        async for raw in stream:
            try:
                sample = decode(SampleEvent, raw)
            except InvalidEvent:
                continue  # the join wrote it; a bad one is the join's bug, not a rollout signal
            await ready.wait()
            controller.on_sample(sample)

    @app.agent(dead_letters)
    async def count_dead_letters(stream: Any) -> None:
        async for raw in stream:
            try:
                letter = decode(DeadLetterEvent, raw)
            except InvalidEvent:
                continue
            found = generation_of_dead_letter(letter)
            if found is not None:
                await ready.wait()
                controller.on_dead_letter(*found)

    @app.agent(replica_status)
    async def count_replica_traffic(stream: Any) -> None:
        async for raw in stream:
            try:
                status = decode(ReplicaStatusEvent, raw)
            except InvalidEvent:
                continue  # the sink dead-letters bad status events; here they are no signal
            await ready.wait()
            controller.on_replica_status(status)

    @app.timer(interval=settings.rollout_decide_interval_s)
    async def decide_rollouts() -> None:
        if ready.is_set():
            await send_rollouts(controller.tick(now_ms()))


def generation_of_dead_letter(letter: DeadLetterEvent) -> tuple[str, int] | None:
    """(model, policy_version) of a dead-lettered generation when its bytes still say so, else None."""
    if not letter.source_topic.endswith(GENERATIONS.name):
        return None
    try:
        body = orjson.loads(base64.b64decode(letter.original_b64))
    except (ValueError, orjson.JSONDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    model, version = body.get("model"), body.get("policy_version")
    if isinstance(model, str) and isinstance(version, int) and not isinstance(version, bool):
        return model, version
    return None
