"""A fault-injection harness for the loop: real processes, kill -9, broker restarts.

`ChaosLoop` runs the embedded broker (restartable on the same port and data directory),
`rlfeed up` against it (ClickHouse through chdb, the sink; no broker of its own), a
stream worker and the gateway, each as a child process. `Traffic` sends generations and
one terminal feedback each through the gateway, retrying with the same event ids until
accepted. `reconcile` reads samples.v1, dlq.v1 and (once the stack is stopped) the chdb
database, and counts what was lost or duplicated. Used by tests/chaos/ (small) and
bench/chaos.py (large).

noida-db keeps topics, records and committed group offsets across a SIGKILL and a
restart on the same data directory (the loop picks up where it was). The stream worker
runs with static group membership: noida-db never expires a killed member, so without
it a restarted worker waits forever for its partitions.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson

from schemas.events import FeedbackEvent, GenerationEvent, now_ms
from schemas.topics import DLQ, FEEDBACK, JOIN_PARTITIONS, SAMPLES
from services.demo.children import Child, base_env, child_env
from services.kafka.embedded import EmbeddedBroker, free_port
from services.logs import records
from services.stack import state as stack_state

SCALES = {
    "small": {"events": 120, "rate_per_s": 3.0, "together": True, "model": False},
    "medium": {"events": 120, "rate_per_s": 3.0, "together": True, "model": True},
    "large": {"events": 3000, "rate_per_s": 15.0, "together": False, "model": True},
}
"""small: CI (~1.5 min; no trainer or replica: they take 1-2 min each to restart on 2
shared cores); medium: every process, killed two at a time (~6 min); large: every
process in turn."""
MODEL = "smollm2-135m-instruct"
"""The model name the trainer and the replica serve (their default)."""
TRAINER = {
    "publish_every_steps": 1,
    "publish_every_s": 0,
    "checkpoint_every_steps": 1,
    "trainer_batch_size": 8,
    "heldout_every": 4,
    "gate_min_heldout": 2,
    "gate_max_truncated_frac": 1.0,
    "gate_max_new_tokens": 8,
    "gate_prompts": 4,
}
"""The trainer at the tiny model's size: a step, a checkpoint and a version every 8 samples."""


def scale() -> dict:
    """The size of a run: RLFEED_CHAOS_SCALE=small (default, CI), medium or large."""
    return SCALES[os.environ.get("RLFEED_CHAOS_SCALE", "small")]


def _log_has(child: Child, name: str, after: int, pred=lambda r: True) -> bool:
    return any(pred(r) for r in records(child.log_path.read_bytes()[after:], name))


@dataclass
class ChaosLoop:
    """The processes of one run, under `home`."""

    home: Path
    repo_root: Path
    prefix: str = field(default_factory=lambda: f"chaos{uuid.uuid4().hex[:6]}.")
    broker: EmbeddedBroker | None = None
    children: dict[str, Child] = field(default_factory=dict)
    model_dir: Path | None = None
    """With a model directory, the trainer and one serving replica run too."""
    gateway_key: str = ""
    replica_port: int = 0
    gateway_port: int = 0
    recovery_s: dict[str, list[float]] = field(default_factory=dict)
    killed: Counter = field(default_factory=Counter)

    @property
    def logs(self) -> Path:
        return self.home / "logs"

    def _env(self) -> dict[str, str]:
        assert self.broker is not None
        return child_env(
            base_env(),
            home_dir=self.home,
            topic_prefix=self.prefix,
            kafka_url=self.broker.url,
            log_level="info",
            dashboard_enabled="false",
            status_interval_s=1,
        )

    # --- start ---
    def start(self) -> ChaosLoop:
        from services.apikeys import create_key

        self.broker = EmbeddedBroker(self.home / "broker").start()
        keys = self.home / "gateway-keys.json"
        self.gateway_key = create_key(keys, "acme")
        self.gateway_port = free_port()
        env = self._env()
        self.children = {
            "stack": Child(
                "stack",
                ["up"],
                child_env(env, sink_session_timeout_s=6, sink_max_poll_interval_s=10, sink_batch_max_wait_s=0.3),
                self.logs,
            ),
            "streams": Child(
                "streams",
                ["streams"],
                child_env(
                    env,
                    streams_web_enabled="false",
                    group_instance_id="chaos-streams-1",
                    settle_window_s=2,
                    session_timeout_s=6,
                    max_poll_interval_s=10,
                    tick_interval_s=0.2,
                ),
                self.logs,
            ),
            "gateway": Child(
                "gateway", ["gateway"], child_env(env, keys_file=keys, gateway_port=self.gateway_port), self.logs
            ),
        }
        if self.model_dir is not None:
            self.replica_port = free_port()
            model_env = child_env(env, model_dir=self.model_dir)
            self.children["trainer"] = Child("trainer", ["train"], child_env(model_env, **TRAINER), self.logs)
            self.children["replica"] = Child(
                "replica",
                ["serve"],
                child_env(model_env, serving_port=self.replica_port, replica_id="chaos-0"),
                self.logs,
            )
        # The stack creates the topics; the others start together once it is up.
        self._start_child("stack")
        rest = [n for n in self.children if n != "stack"]
        logs_from = {n: self._log_size(n) for n in rest}
        for name in rest:
            self.children[name].start()
        for name in rest:
            self.children[name].wait_ready(lambda n=name: self._ready(n, logs_from[n]), 180)
        return self

    def _log_size(self, name: str) -> int:
        path = self.children[name].log_path
        return path.stat().st_size if path.exists() else 0

    def replica_health(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.replica_port}/health", timeout=5).json()

    def latest_published(self) -> int | None:
        from services.checkpoints.store import CheckpointStore

        return CheckpointStore(self.home / "checkpoints").latest_version(MODEL)

    def _ready(self, name: str, log_from: int) -> bool:
        child = self.children[name]
        if name == "stack":
            return (self.home / "stack.json").exists() and stack_state.read(self.home) is not None
        if name == "streams":
            return _log_has(
                child, "streams.assigned", log_from, lambda r: len(r.get("partitions", [])) == JOIN_PARTITIONS
            )
        if name == "gateway":
            return httpx.get(f"{self.gateway_url}/health", timeout=2).status_code == 200
        if name == "trainer":
            return _log_has(child, "trainer_started", log_from)
        if name == "replica":
            return httpx.get(f"http://127.0.0.1:{self.replica_port}/health", timeout=2).status_code == 200
        raise KeyError(name)

    def _start_child(self, name: str, timeout_s: float = 120) -> float:
        child = self.children[name]
        log_from = child.log_path.stat().st_size if child.log_path.exists() else 0
        started = time.monotonic()
        child.start()
        child.wait_ready(lambda: self._ready(name, log_from), timeout_s)
        return time.monotonic() - started

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    # --- faults ---
    def kill9_and_restart(self, name: str) -> float:
        """kill -9 one child, start it again; seconds from the kill to ready again."""
        child = self.children[name]
        assert child.proc is not None and child.alive(), f"{name} is not running:\n{child.tail()}"
        t0 = time.monotonic()
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(30)
        self.killed[name] += 1
        if name == "stack":
            stack_state.clear(self.home)
        self._start_child(name)
        took = time.monotonic() - t0
        self.recovery_s.setdefault(name, []).append(round(took, 2))
        return took

    def kill9_and_restart_together(self, names: list[str]) -> None:
        """kill -9 several children at once and restart them, each timed from its kill to
        ready. (Started from this thread: a child dies with the thread that started it.)"""
        killed_at, logs_from = {}, {}
        for name in names:
            child = self.children[name]
            assert child.proc is not None and child.alive(), f"{name} is not running:\n{child.tail()}"
            killed_at[name] = time.monotonic()
            child.proc.send_signal(signal.SIGKILL)
            child.proc.wait(30)
            self.killed[name] += 1
            if name == "stack":
                stack_state.clear(self.home)
        for name in names:
            logs_from[name] = self._log_size(name)
            self.children[name].start()
        pending = list(names)
        deadline = time.monotonic() + 240
        while pending:
            for name in list(pending):
                child = self.children[name]
                if not child.alive():
                    raise RuntimeError(f"{name} exited after its restart:\n{child.tail()}")
                try:
                    ready = self._ready(name, logs_from[name])
                except Exception:
                    ready = False
                if ready:
                    self.recovery_s.setdefault(name, []).append(round(time.monotonic() - killed_at[name], 2))
                    pending.remove(name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after a restart: {pending}")
            time.sleep(0.5)

    def restart_broker(self, down_s: float = 2.0, kill9: bool = False) -> float:
        """Stop the broker (`EmbeddedBroker.stop`: its Kafka service closed and saved, then
        SIGINT; or SIGKILL at once with `kill9`), leave it down `down_s`, start it on the
        same port and data directory; seconds until it answers again. (A SIGKILL can lose
        the writes noida-db acknowledged last: one acks=all event pair in
        bench/chaos.py --broker-kill9.)"""
        assert self.broker is not None
        t0 = time.monotonic()
        proc = self.broker.proc
        assert proc is not None
        if kill9:
            proc.kill()
            proc.wait(30)
            self.broker.proc = None
        else:
            self.broker.stop()
        self.killed["broker"] += 1
        time.sleep(down_s)
        self.broker.start()
        took = time.monotonic() - t0
        self.recovery_s.setdefault("broker", []).append(round(took, 2))
        return took

    def dead_children(self) -> list[str]:
        return [n for n, c in self.children.items() if not c.alive()]

    # --- stop ---
    def stop(self) -> None:
        for name in ("replica", "trainer", "gateway", "streams", "stack"):
            child = self.children.get(name)
            if child is not None:
                child.stop(30)
        if self.broker is not None:
            self.broker.stop()


@dataclass
class Traffic:
    """Generations and one terminal feedback each, through the gateway, with retries."""

    url: str
    key: str
    n: int
    rate_per_s: float
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:6])
    accepted_generations: set[str] = field(default_factory=set)
    accepted_feedback: dict[str, str] = field(default_factory=dict)
    """feedback event id -> generation id."""
    keep_going: threading.Event = field(default_factory=threading.Event)
    """While set, traffic goes on past `n` events (so every fault lands while it flows)."""
    sent: int = 0
    attempts: int = 0
    retries: int = 0
    failed: int = 0
    _thread: threading.Thread | None = None

    def generation(self, i: int) -> bytes:
        gid = f"cg-{self.run_id}-{i}"
        ev = GenerationEvent(
            event_id=f"{gid}-gen",
            event_time_ms=now_ms(),
            generation_id=gid,
            model=MODEL,
            policy_version=0,
            prompt="p",
            completion="a b c",
            prompt_token_ids=[1, 2],
            completion_token_ids=[3, 4],
            completion_logprobs=[-0.5, -0.25],
            user_id=f"u{i % 17}",
        )
        return orjson.dumps(ev.model_dump(mode="json", exclude={"tenant_id"}, exclude_none=True))

    def feedback(self, i: int) -> bytes:
        gid = f"cg-{self.run_id}-{i}"
        kind = "accept" if i % 3 else "reject"
        ev = FeedbackEvent(event_id=f"{gid}-fb", event_time_ms=now_ms(), generation_id=gid, kind=kind, user_id="u")
        return orjson.dumps(ev.model_dump(mode="json", exclude={"tenant_id"}, exclude_none=True))

    def _send(self, client: httpx.Client, path: str, body: bytes, deadline_s: float = 120) -> bool:
        deadline = time.monotonic() + deadline_s
        first = True
        while time.monotonic() < deadline:
            self.attempts += 1
            if not first:
                self.retries += 1
            first = False
            try:
                r = client.post(
                    f"{self.url}{path}",
                    content=body,
                    headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"},
                    timeout=15,
                )
                if r.status_code == 200:
                    return True
                if r.status_code < 500 and r.status_code not in (408, 429):
                    raise AssertionError(f"{path} refused a valid event: {r.status_code} {r.text[:300]}")
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.failed += 1
        return False

    def run(self) -> None:
        with httpx.Client() as client:
            i = 0
            while i < self.n or self.keep_going.is_set():
                t0 = time.monotonic()
                self.sent = i + 1
                gid = f"cg-{self.run_id}-{i}"
                if self._send(client, "/v1/generations", self.generation(i)):
                    self.accepted_generations.add(gid)
                    if self._send(client, "/v1/feedback", self.feedback(i)):
                        self.accepted_feedback[f"{gid}-fb"] = gid
                time.sleep(max(0.0, 1 / self.rate_per_s - (time.monotonic() - t0)))
                i += 1

    def start(self) -> Traffic:
        self._thread = threading.Thread(target=self.run, name="traffic", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float | None = None) -> None:
        assert self._thread is not None
        self._thread.join(timeout_s)

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()


def read_all(bootstrap: str, topic: str, partitions: int) -> list[bytes]:
    """Every value in `topic` now (up to each partition's end)."""
    return [value for _, _, value in read_all_at(bootstrap, topic, partitions)]


def read_all_at(bootstrap: str, topic: str, partitions: int) -> list[tuple[int, int, bytes]]:
    """Every (partition, offset, value) in `topic` now (up to each partition's end)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"r-{uuid.uuid4().hex}", "enable.auto.commit": False}
    )
    try:
        ends = {}
        for p in range(partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high > low:
                ends[p] = (low, high)
        consumer.assign([TopicPartition(topic, p, lo) for p, (lo, _) in ends.items()])
        pos = {p: lo - 1 for p, (lo, _) in ends.items()}
        out: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + 60
        while any(pos[p] + 1 < ends[p][1] for p in ends) and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                if m.error() is None:
                    out.append((m.partition(), m.offset(), m.value()))
                    pos[m.partition()] = m.offset()
        return out
    finally:
        consumer.close()


def join_outcome(bootstrap: str, prefix: str, traffic: Traffic) -> dict:
    """Every accepted feedback event: in how many distinct samples, or in a dead letter."""
    import base64

    samples = {}
    for raw in read_all(bootstrap, SAMPLES.full_name(prefix), JOIN_PARTITIONS):
        s = orjson.loads(raw)
        samples[s["event_id"]] = s
    in_samples: Counter[str] = Counter()
    for s in samples.values():
        for fid in s.get("feedback_event_ids", []):
            in_samples[fid] += 1
    lettered: set[str] = set()
    for raw in read_all(bootstrap, DLQ.full_name(prefix), 1):
        d = orjson.loads(raw)
        try:
            lettered.add(orjson.loads(base64.b64decode(d["original_b64"])).get("event_id", ""))
        except (orjson.JSONDecodeError, AttributeError, ValueError):
            continue
    accepted = traffic.accepted_feedback
    lost = [f for f in accepted if in_samples[f] == 0 and f not in lettered]
    lost_in_topic: dict[str, list[tuple[int, int]]] = {}
    if lost:
        # Where each lost event sits in feedback.v1: absent means the broker lost an
        # acknowledged write; present means the consumers skipped it.
        lost_in_topic = {f: [] for f in lost[:5]}
        for part, offset, raw in read_all_at(bootstrap, FEEDBACK.full_name(prefix), JOIN_PARTITIONS):
            fid = orjson.loads(raw).get("event_id")
            if fid in lost_in_topic:
                lost_in_topic[fid].append((part, offset))
    duplicated = [f for f in accepted if in_samples[f] > 1]
    return {
        "samples_distinct": len(samples),
        "feedback_in_samples": sum(1 for f in accepted if in_samples[f] >= 1),
        "feedback_dead_lettered": sum(1 for f in accepted if f in lettered and in_samples[f] == 0),
        "lost": len(lost),
        "lost_examples": lost[:5],
        "lost_in_topic": lost_in_topic,
        "duplicated": len(duplicated),
        "duplicated_examples": duplicated[:5],
        "mine": {f for f in accepted},
    }


def clickhouse_counts(home: Path, prefix: str, run_id: str) -> dict:
    """Rows, rows after FINAL and distinct event ids of this run in the chdb database
    (open it only once the stack is stopped: chdb locks its directory to one process)."""
    from services.clickhouse.client import connect
    from services.stack.settings import StackSettings

    url = StackSettings(home_dir=home, topic_prefix=prefix).embedded_clickhouse_url
    client = connect(url)
    like = f"cg-{run_id}-%"
    out = {}
    for table in ("generations", "feedback", "samples"):
        where = f"WHERE generation_id LIKE '{like}'"
        rows = int(client.command(f"SELECT count() FROM {table} {where}"))
        final = int(client.command(f"SELECT count() FROM {table} FINAL {where}"))
        distinct = int(client.command(f"SELECT uniqExact(event_id) FROM {table} {where}"))
        out[table] = {"rows": rows, "final": final, "distinct": distinct}
    out["dead_letters"] = int(client.command("SELECT count() FROM dead_letters FINAL"))
    client.close()
    return out


def _wait(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if cond():
                return True
        except Exception:
            pass
        time.sleep(1)
    return False


def fault_groups(with_model: bool, together: bool) -> list[list[str]]:
    """What is killed, in order: one process at a time, or (`together`, the CI size) the
    slow-to-start model processes at the same time as the stream worker and the stack."""
    if together:
        return [
            ["streams", *(["trainer"] if with_model else [])],
            ["stack", *(["replica"] if with_model else [])],
            ["gateway"],
            ["broker"],
        ]
    return [[n] for n in ("streams", "stack", "gateway", *(("trainer", "replica") if with_model else ()))] + [
        ["broker"]
    ]


def run_chaos(
    home: Path,
    repo_root: Path,
    events: int,
    rate_per_s: float,
    model_dir: Path | None = None,
    together: bool = False,
    broker_kill9: bool = False,
    say=print,
) -> dict:
    """One run: start, send traffic, kill -9 each process in turn and restart the broker
    while it flows, drain, stop, reconcile. Returns the figures (bench/chaos.py prints them)."""
    loop = ChaosLoop(home, repo_root, model_dir=model_dir)
    report: dict = {}
    try:
        loop.start()
        say(f"up: broker {loop.broker.bootstrap if loop.broker else None}, prefix {loop.prefix}")
        traffic = Traffic(loop.gateway_url, loop.gateway_key, events, rate_per_s)
        traffic.keep_going.set()
        traffic.start()
        groups = fault_groups(model_dir is not None, together)
        for i, group in enumerate(groups):
            # spread the faults over the traffic
            target = (i + 1) * events // (len(groups) + 1)
            _wait(lambda t=target: len(traffic.accepted_feedback) >= t or traffic.done, 600)
            if group == ["broker"]:
                loop.restart_broker(kill9=broker_kill9)
            else:
                loop.kill9_and_restart_together(group)
            say(f"{'+'.join(group)}: killed and back in {[loop.recovery_s[n][-1] for n in group]} s")
            time.sleep(2)  # some traffic on the restarted process before the next fault
        traffic.keep_going.clear()
        traffic.join(900)
        bootstrap = loop.broker.bootstrap if loop.broker else ""
        outcome: dict = {}

        def settled() -> bool:
            outcome.update(join_outcome(bootstrap, loop.prefix, traffic))
            return outcome["lost"] == 0

        report["join_settled"] = _wait(settled, 120)

        def sunk() -> bool:
            # Every table: the sink reads each partition at its own pace (an idle one is
            # paused for a while at its end), so a generation may land after its feedback.
            rows = (stack_state.read(home) or {}).get("clickhouse_rows") or {}
            return (
                rows.get("generations", -1) >= len(traffic.accepted_generations)
                and rows.get("feedback", -1) >= len(traffic.accepted_feedback)
                and rows.get("samples", -1) >= outcome.get("samples_distinct", 0)
            )

        report["sink_settled"] = _wait(sunk, 120)
        if model_dir is not None:
            # the replica serves the newest version the trainer published
            def serving_latest() -> bool:
                report["latest_published"] = loop.latest_published()
                report["replica_serves"] = loop.replica_health()["policy_version"]
                return report["replica_serves"] == report["latest_published"]

            report["replica_serves_latest"] = _wait(serving_latest, 120)
        report["dead_children_before_stop"] = loop.dead_children()
        report["dead_children_errors"] = {n: _errors_tail(loop.children[n].log_path) for n in loop.dead_children()}
    finally:
        loop.stop()
    ch = clickhouse_counts(home, loop.prefix, traffic.run_id)
    outcome.pop("mine", None)
    report |= {
        "events_sent": traffic.sent,
        "accepted_generations": len(traffic.accepted_generations),
        "accepted": len(traffic.accepted_feedback),
        "not_accepted": traffic.sent - len(traffic.accepted_feedback),
        "client_retries": traffic.retries,
        "dead_lettered": outcome.get("feedback_dead_lettered"),
        "trained_samples": outcome.get("samples_distinct"),
        "in_samples": outcome.get("feedback_in_samples"),
        "in_clickhouse": {t: v["final"] for t, v in ch.items() if isinstance(v, dict)},
        "clickhouse": ch,
        "lost": outcome.get("lost"),
        "lost_examples": outcome.get("lost_examples"),
        "lost_in_topic": outcome.get("lost_in_topic"),
        "duplicated": outcome.get("duplicated"),
        "duplicated_in_clickhouse": sum(v["final"] - v["distinct"] for v in ch.values() if isinstance(v, dict)),
        "processes_killed": dict(loop.killed),
        "recovery_s": loop.recovery_s,
    }
    if model_dir is not None:
        report["trainer"] = trainer_outcome(loop.logs / "trainer.log")
    return report


def _errors_tail(path: Path, n: int = 3) -> list[str]:
    """The last `n` error lines a child logged (why it died)."""
    out = []
    for line in path.read_bytes().splitlines():
        if line.startswith(b"{") and (b'"level":"error"' in line or b'"level":"critical"' in line):
            out.append(line[:600].decode(errors="replace"))
    return out[-n:]


def trainer_outcome(log_path: Path) -> dict:
    """Starts, the step each start resumed from, checkpoints and versions published."""
    started = records(log_path.read_bytes(), "trainer_started")
    stopped = records(log_path.read_bytes(), "trainer_stopped")
    return {
        "starts": len(started),
        "resumed_steps": [r.get("step") for r in started[1:]],
        "resumed_from_checkpoint": len(records(log_path.read_bytes(), "resumed")),
        "checkpoints": len(records(log_path.read_bytes(), "checkpoint")),
        "published": [r.get("version") for r in records(log_path.read_bytes(), "published")],
        "last_stats": stopped[-1] if stopped else None,
    }
