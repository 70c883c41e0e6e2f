"""Run the whole loop: stack, stream worker, trainer, replicas, simulated users.

Start order (each waits for the one before to be ready): the model directory (built if
missing) → `rlfeed up` (broker, topics, ClickHouse, sink) → `rlfeed streams` →
`rlfeed train` → `rlfeed serve` × N → the simulated users, in this process. Stop
order is the reverse, on Ctrl-C, SIGTERM or after `demo_duration_s`. The report (per
policy version: answers, accept rate with a 95% interval, length, distinctness) is
printed as JSON and written to `<home_dir>/demo-report.json`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path

import httpx
import orjson

from schemas.events import FeedbackEvent
from schemas.topics import FEEDBACK, GENERATIONS, PUBLIC_TOPICS, Topic
from services.demo.children import Child, base_env, child_env
from services.demo.settings import DemoSettings
from services.logs import records as log_records
from services.simulator.population import Population
from services.simulator.preference import load as load_preference
from services.sink.settings import SinkSettings
from services.stack import state as stack_state
from streams.settings import StreamsSettings


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(settings: DemoSettings, print_report: bool = True) -> dict:
    """Run the demo to its end and return the report (also printed as JSON unless told not to)."""
    home = settings.home_dir.resolve()
    preference = load_preference(settings.sim_preference)  # fail fast on a bad plug-in
    model_dir = (settings.demo_model_dir or settings.default_model_dir).resolve()
    if not (model_dir / "rlfeed-model.json").exists():
        _say(f"building the model in {model_dir} (once, ~1 min)")
        from services.localmodel.build import build

        build(model_dir, "full")
    env = child_env(base_env(), home_dir=home, model_dir=model_dir, topic_prefix=settings.topic_prefix)
    logs = home / "logs"
    children: list[Child] = []
    started = time.monotonic()
    try:
        # The stack owns ClickHouse and the sink; it starts the embedded broker unless
        # RLFEED_KAFKA_URL names one.
        # The broker, sink and stream worker run at a lower priority: the model processes
        # must come first (their idle consumers no longer spin: services/kafka/idle.py).
        nice = settings.demo_infra_nice
        stack_env = child_env(env, embedded_kafka_port=settings.demo_embedded_kafka_port)
        stack = Child("stack", ["up"], stack_env, logs, nice=nice)
        children.append(stack.start())
        stack.wait_ready(lambda: stack_state.read(home) is not None, settings.demo_startup_timeout_s)
        up = stack_state.read(home)
        kafka_url = up["kafka_url"]
        _say(f"stack up: {kafka_url}, ClickHouse {up['clickhouse_url']}, dashboard {up.get('dashboard_url')}")
        env = child_env(env, kafka_url=kafka_url, rollout_enabled=settings.demo_rollout_enabled)
        streams_env = child_env(
            env,
            settle_window_s=settings.demo_settle_window_s,
            rollout_candidate_traffic_frac=settings.demo_rollout_traffic_frac,
            rollout_min_samples_per_arm=settings.demo_rollout_min_samples_per_arm,
            rollout_max_samples=settings.demo_rollout_max_samples,
            rollout_at_budget="promote_if_not_worse",
            # static membership: a worker restarted after a kill -9 gets its partitions back
            # at once (noida-db never expires the dead member)
            group_instance_id=f"demo-streams-{home.name}",
        )
        streams = Child("streams", ["streams"], streams_env, logs, nice=nice)
        children.append(streams.start())
        trainer_env = child_env(
            env,
            publish_every_steps=settings.demo_publish_every_steps,
            publish_every_s=0,
            trainer_batch_size=settings.demo_trainer_batch_size,
            heldout_every=settings.demo_heldout_every,
        )
        trainer = Child("trainer", ["train"], trainer_env, logs)
        children.append(trainer.start())
        urls = []
        for i in range(settings.demo_replicas):
            port = settings.demo_first_port + i
            replica_env = child_env(env, serving_port=port, replica_id=f"replica-{i}")
            replica = Child(f"replica-{i}", ["serve"], replica_env, logs)
            children.append(replica.start())
            urls.append(f"http://127.0.0.1:{port}")
        for url, replica in zip(urls, children[-len(urls) :], strict=True):
            replica.wait_ready(
                lambda u=url: httpx.get(f"{u}/health", timeout=2).status_code == 200, settings.demo_startup_timeout_s
            )
        trainer.wait_ready(
            lambda: b'"trainer_started"' in trainer.log_path.read_bytes(), settings.demo_startup_timeout_s
        )
        _say(f"trainer up; {len(urls)} replicas up: {', '.join(urls)}; logs in {logs}")
        sim_settings = settings.model_copy(update={"sim_replica_urls": tuple(urls), "kafka_url": kafka_url})
        report = asyncio.run(_simulate(sim_settings, preference, children, time.monotonic()))
        # Drain: the replicas flush their last generation events as they stop; the stream
        # worker must consume them (and the last feedback) before its counters are final.
        for child in reversed(children):
            if child.name.startswith("replica-"):
                child.stop()
        prefix, wait_s = settings.topic_prefix, settings.demo_drain_timeout_s
        streams_group = StreamsSettings(topic_prefix=prefix).group_id
        report["streams_drained"] = _wait_drained(kafka_url, prefix, streams_group, (GENERATIONS, FEEDBACK), wait_s)
        # ... and then the sink must have copied everything the stream wrote.
        sink_group = f"{prefix}{SinkSettings(topic_prefix=prefix).sink_group_id}"
        report["sink_drained"] = _wait_drained(kafka_url, prefix, sink_group, PUBLIC_TOPICS, wait_s)
        report["clickhouse_rows"] = _final_counts(home, settings)
    finally:
        for child in reversed(children):
            child.stop(settings.demo_trainer_stop_grace_s if child.name == "trainer" else 20.0)
    report["elapsed_s"] = round(time.monotonic() - started, 1)  # start-up included
    report["streams"] = _last_log_fields(logs / "streams.log", "streams.join_stopped")
    report["trainer"] = _last_log_fields(logs / "trainer.log", "trainer_stopped")
    report["published_versions"] = _published_versions(logs / "trainer.log")
    report["rollouts"] = rollout_decisions(_log_lines(logs / "streams.log", "rollout_decision"))
    report["publish_to_serving_s"] = publish_to_serving(
        _log_lines(logs / "trainer.log", "published"),
        [
            r
            for i in range(settings.demo_replicas)
            for name in ("weights_swapped", "rollout_candidate_loaded")
            for r in _log_lines(logs / f"replica-{i}.log", name)
        ],
    )
    report["summary"] = summarize(report, settings.demo_report_min_answers)
    (home / "demo-report.json").write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    if print_report:
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return report


def _final_counts(home, settings: DemoSettings) -> dict | None:
    """ClickHouse row counts once the last feedback has settled (from the stack's state file,
    since the stack process owns the embedded database)."""
    settled_at = time.time() + settings.demo_settle_window_s + 2
    deadline = settled_at + 60
    while time.time() < deadline:
        state = stack_state.read(home)
        if state is None:
            return None
        if state.get("updated_at", 0) > settled_at:
            return state.get("clickhouse_rows")
        time.sleep(1)
    return None


def _wait_drained(kafka_url: str, prefix: str, group: str, topics: tuple[Topic, ...], timeout_s: float) -> bool:
    """Wait until consumer `group` has committed every event in `topics` (all partitions);
    False if it had not after `timeout_s`."""
    from confluent_kafka import TopicPartition

    from services.dashboard.lag import LagProbe
    from services.kafka.url import bootstrap_servers

    partitions = [TopicPartition(t.full_name(prefix), p) for t in topics for p in range(t.partitions)]
    names = {tp.topic for tp in partitions}
    probe = LagProbe(bootstrap_servers(kafka_url), [group])
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            committed = sum(r.committed for r in probe.probe() if r.topic in names)
            ends = sum(probe.consumer.get_watermark_offsets(tp, timeout=5)[1] for tp in partitions)
            if committed >= ends:
                return True
            if time.monotonic() > deadline:
                _say(f"{group} had not consumed {ends - committed} events after {timeout_s:.0f} s")
                return False
            time.sleep(0.5)
    finally:
        probe.close()


def _log_lines(path: Path, name: str) -> list[dict]:
    try:
        return log_records(path.read_bytes(), name)
    except FileNotFoundError:
        return []


def _last_log_fields(path: Path, name: str) -> dict | None:
    """The fields of the last `name` event a child logged (its final counters)."""
    lines = _log_lines(path, name)
    return lines[-1] if lines else None


def _published_versions(path: Path) -> dict:
    """Versions the trainer published and the ones its gate refused."""
    published = [r.get("version") for r in _log_lines(path, "published")]
    refused = _log_lines(path, "gate_refused")
    return {"published": published, "gate_refused": len(refused)}


def publish_to_serving(published: list[dict], swapped: list[dict]) -> dict:
    """Seconds from each trained version's `published` log line to each replica's
    `weights_swapped` (or, with rollouts, `rollout_candidate_loaded`) line for it: p50,
    max, and how many (version, replica) swaps."""
    at = {r["version"]: r["ts"] for r in published if r.get("version")}
    delays = sorted(r["ts"] - at[r["version"]] for r in swapped if r.get("version") in at and not r.get("rollback"))
    if not delays:
        return {"swaps": 0}
    return {"p50": round(delays[len(delays) // 2], 2), "max": round(delays[-1], 2), "swaps": len(delays)}


def rollout_decisions(records: list[dict]) -> list[dict]:
    """The canary rollouts' starts, promotions and rollbacks (not the periodic collect reports)."""
    out = []
    for r in records:
        decision = r.get("decision")
        if decision == "collect" and "starts" not in str(r.get("reason", "")):
            continue
        keys = ("ts", "decision", "stable", "candidate", "decided", "reason", "stable_n", "candidate_n")
        out.append({k: r.get(k) for k in keys})
    return out


def summarize(report: dict, min_answers: int = 1) -> dict:
    """First and last policy versions that users saw (the last one with at least
    `min_answers` answers), and the relative change in accept rate."""
    versions = report.get("versions", {})
    if not versions:
        return {}
    order = sorted(versions, key=int)
    enough = [v for v in order if versions[v]["answers"] >= min_answers] or order
    first, last = versions[order[0]], versions[enough[-1]]
    base = first["accept_rate"]
    return {
        "first_version": int(order[0]),
        "last_version": int(enough[-1]),
        "first": first,
        "last": last,
        "relative_improvement": round((last["accept_rate"] - base) / base, 3) if base > 0 else None,
        "versions_served": len(order),
    }


async def _simulate(settings: DemoSettings, preference, children: list[Child], started: float) -> dict:
    from services.kafka.url import bootstrap_servers
    from services.sdk.client import AsyncFeedbackClient

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Feedback goes through the SDK, as a product app would send it.
    client = AsyncFeedbackClient(
        transport="kafka", bootstrap=bootstrap_servers(settings.kafka_url), topic_prefix=settings.topic_prefix
    )

    async def send(feedback: FeedbackEvent) -> None:
        if not client.enqueue(FEEDBACK, feedback):
            raise RuntimeError("SDK buffer full")

    population = Population(settings, preference, send)
    runner = asyncio.create_task(population.run(stop))
    streams_log = next((c.log_path for c in children if c.name == "streams"), None)
    rollouts_said = 0
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), settings.demo_progress_interval_s)
            elapsed = time.monotonic() - started
            _say(_progress_line(elapsed, population))
            if streams_log is not None and settings.demo_rollout_enabled:
                said = rollout_decisions(_log_lines(streams_log, "rollout_decision"))
                for r in said[rollouts_said:]:
                    if r["decision"] == "collect":
                        _say(f"rollout: v{r['candidate']} serves a slice beside stable v{r['stable']}: {r['reason']}")
                    else:
                        _say(f"rollout: {r['decision']} of v{r['decided']} (stable now v{r['stable']}): {r['reason']}")
                rollouts_said = len(said)
            dead = [c.name for c in children if not c.alive()]
            if dead:
                _say(f"stopping: {', '.join(dead)} exited; see their logs")
                stop.set()
            if settings.demo_duration_s and elapsed >= settings.demo_duration_s:
                stop.set()
        await runner
    finally:
        await client.close()
    return population.summary()


def _progress_line(elapsed_s: float, population: Population) -> str:
    parts = []
    for version, stats in sorted(population.stats.items()):
        s = stats.summary()
        parts.append(
            f"v{version}: {s['accept_rate']:.2f} [{s['accept_ci95'][0]:.2f}-{s['accept_ci95'][1]:.2f}] "
            f"n={s['answers']} {s['mean_words']:.0f}w"
        )
    return f"[{elapsed_s:6.0f}s] feedback sent {population.feedback_sent}, errors {population.errors} | " + (
        " | ".join(parts) or "waiting for the first answers"
    )
