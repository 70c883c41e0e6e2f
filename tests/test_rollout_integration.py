"""Canary rollouts through the real broker: a streams worker decides, two replicas follow.

A worse candidate is rolled back and a better one promoted, automatically, while
requests from many users keep flowing to both replicas without one failing. The
decision is fed synthetic samples on samples.v1 (known accept rates per version) so it
decides in seconds; the split, the weights and the events are the real ones.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
from confluent_kafka import Producer

from schemas.codec import encode, key_of
from schemas.events import ModelUpdateEvent, SampleEvent, now_ms
from schemas.topics import MODEL_UPDATES, ROLLOUTS, SAMPLES
from services.kafka.producers import producer_config
from services.rollout.control import read_latest
from services.serving.settings import ServingSettings
from services.serving.split import Split
from tests.test_serving_support import wait_for
from tests.test_streams_worker import Worker

MODEL = "canary-policy"
TRAFFIC = 0.5
USERS = [f"user-{i}" for i in range(24)]


def _publish(bootstrap: str, prefix: str, events: list) -> None:
    p = Producer(producer_config(bootstrap))
    for ev in events:
        topic = MODEL_UPDATES if isinstance(ev, ModelUpdateEvent) else SAMPLES
        p.produce(topic.full_name(prefix), value=encode(ev), key=key_of(ev, topic.key))
    assert p.flush(30) == 0


def _replica_settings(
    bootstrap: str, prefix: str, model_dir: Path, model: str, tmp_path: Path, store_root: Any, **extra: Any
) -> ServingSettings:
    """A rollout-following replica of the tiny model (each test names its replica_id)."""
    return ServingSettings(
        kafka_url=f"kafka://{bootstrap}",
        topic_prefix=prefix,
        model_dir=model_dir,
        model_name=model,
        serving_port=0,
        home_dir=tmp_path / "home",
        checkpoint_dir=store_root,
        rollout_enabled=True,
        max_batch_size=4,
        batch_wait_ms=2,
        default_max_tokens=3,
        **extra,
    )


def _candidate_everywhere(replicas: list[Any], version: int | None) -> bool:
    return all(s.replica.engine.candidate_version == version for s in replicas)


def _load_candidate(replicas: list[Any], worker: Any, bootstrap: str, prefix: str, update: Any) -> None:
    """Wait until every replica serves `update`'s version as the candidate; the worker's
    Faust consumer may join late, so the model update is republished until it does."""
    deadline = time.monotonic() + 60
    while not _candidate_everywhere(replicas, update.version):
        assert time.monotonic() < deadline, worker.log_path.read_text()[-3000:]
        _publish(bootstrap, prefix, [update])
        wait_for(
            lambda: _candidate_everywhere(replicas, update.version) or time.monotonic() > deadline,
            5,
            f"candidate {update.version}",
        )


def _consumed(bootstrap: str, group: str, topic: str) -> bool:
    """Whether consumer group `group` committed every partition of `topic` to its end."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        committed = c.committed([TopicPartition(topic, p) for p in parts], timeout=10)
        ends = [c.get_watermark_offsets(tp, timeout=10)[1] for tp in committed]
        return all(end == 0 or tp.offset >= end for tp, end in zip(committed, ends, strict=True))
    finally:
        c.close()


def _samples(
    version: int, accept_rate: float, n: int, rng: random.Random, generated_at_ms: int | None = None
) -> list[SampleEvent]:
    return [
        SampleEvent(
            generation_id=f"gen-{uuid.uuid4().hex}",
            model=MODEL,
            policy_version=version,
            prompt="p",
            completion="c",
            prompt_token_ids=[1],
            completion_token_ids=[5, 6, 7],
            completion_logprobs=[-0.5] * 3,
            reward=1.0 if rng.random() < accept_rate else -1.0,
            reward_components={},
            feedback_event_ids=[],
            settle_reason="terminal",
            user_id=rng.choice(USERS),
            generated_at_ms=now_ms() if generated_at_ms is None else generated_at_ms,
        )
        for _ in range(n)
    ]


@pytest.mark.timeout(240)
def test_worse_candidate_rolled_back_better_promoted(
    kafka_bootstrap: str, topic_prefix: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    from services.checkpoints.store import CheckpointStore
    from services.serving.server import ServerThread

    store = CheckpointStore(tmp_path / "checkpoints")
    v0 = load_file(tiny_model_dir / "model.safetensors")
    store.publish(MODEL, 0, v0, parent_version=None, full=True)
    ev1 = store.publish(
        MODEL, 1, {k: t * 1.5 if "mlp" in k else t for k, t in v0.items()}, parent_version=0, full=False
    )
    ev2 = store.publish(
        MODEL, 2, {k: t * 0.5 if "mlp" in k else t for k, t in v0.items()}, parent_version=1, full=False
    )

    group = f"g-{uuid.uuid4().hex[:8]}"
    worker = Worker(
        kafka_bootstrap,
        topic_prefix,
        group,
        tmp_path / "worker.log",
        RLFEED_ROLLOUT_ENABLED="true",
        RLFEED_ROLLOUT_CANDIDATE_TRAFFIC_FRAC=str(TRAFFIC),
        RLFEED_ROLLOUT_MIN_SAMPLES_PER_ARM="20",
        RLFEED_ROLLOUT_DECIDE_INTERVAL_S="0.3",
        RLFEED_ROLLOUT_REPORT_EVERY_SAMPLES="40",
    )
    base = _replica_settings(kafka_bootstrap, topic_prefix, tiny_model_dir, MODEL, tmp_path, store.root)
    rng = random.Random(5)
    rollouts_topic = ROLLOUTS.full_name(topic_prefix)
    results: list[tuple[float, str, int]] = []  # (time, user, version)
    errors: list[BaseException] = []
    stop = threading.Event()
    try:
        with (
            ServerThread(base.model_copy(update={"replica_id": "canary-a"})) as a,
            ServerThread(base.model_copy(update={"replica_id": "canary-b"})) as b,
        ):
            replicas = [a, b]
            clients = [openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0) for s in replicas]

            def load(i: int) -> None:
                for n in itertools.count():
                    if stop.is_set():
                        return
                    user = USERS[(i * 7 + n) % len(USERS)]
                    try:
                        sent = time.monotonic()  # a request sent before a swap may finish after it
                        r = clients[n % 2].completions.create(model=MODEL, prompt=f"hi {n}", max_tokens=3, user=user)
                        assert r.choices[0].finish_reason
                        results.append((sent, user, r.model_extra["policy_version"]))
                    except BaseException as exc:
                        errors.append(exc)
                        return

            threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(2)]
            for t in threads:
                t.start()
            worker.wait_log("rollout_ready", timeout_s=60)

            # --- 1. a worse candidate: on half the users, then rolled back ------------
            _load_candidate(replicas, worker, kafka_bootstrap, topic_prefix, ev1)
            loaded_at = time.monotonic()
            wait_for(lambda: sum(v == 1 for t, _, v in results if t > loaded_at) >= 3, 30, "requests on 1")
            during = [(u, v) for t, u, v in results if t > loaded_at]
            split = Split(0, 1, TRAFFIC)
            assert all(v == (1 if split.wants_candidate(MODEL, u) else 0) for u, v in during), during
            # Stable samples generated while the candidate was still loading (1 ms after the
            # rollout started) are outside the compared window: consumed first, never counted.
            started_ms = int(read_latest(kafka_bootstrap, rollouts_topic)[MODEL][0].arms["rollout.started_ms"])
            _publish(kafka_bootstrap, topic_prefix, _samples(0, 1.0, 200, rng, generated_at_ms=started_ms + 1))
            samples_topic = SAMPLES.full_name(topic_prefix)
            wait_for(lambda: _consumed(kafka_bootstrap, f"{topic_prefix}{group}-app", samples_topic), 30, "early")
            # Candidate samples first: stamped before the stable ones, as a candidate's real
            # first answers are before the replica report that counts them.
            _publish(kafka_bootstrap, topic_prefix, _samples(1, 0.1, 60, rng) + _samples(0, 0.8, 60, rng))
            rolled = worker.wait_log("rollout_decision", lambda r: r["decision"] == "rollback", timeout_s=30)
            assert rolled["stable_n"] <= 60 and rolled["reason"].startswith("candidate worse"), rolled
            wait_for(lambda: _candidate_everywhere(replicas, None), 30, "the rollback to reach both replicas")
            assert all(s.replica.engine.version == 0 for s in replicas)

            # --- 2. a better candidate: promoted, then served to everyone ---------------
            _publish(kafka_bootstrap, topic_prefix, [ev2])
            wait_for(lambda: _candidate_everywhere(replicas, 2), 30, "candidate 2")
            _publish(kafka_bootstrap, topic_prefix, _samples(2, 0.95, 60, rng) + _samples(0, 0.3, 60, rng))
            worker.wait_log("rollout_decision", lambda r: r["decision"] == "promote", timeout_s=30)
            wait_for(lambda: all(s.replica.engine.version == 2 for s in replicas), 30, "the promotion")
            promoted_at = time.monotonic()
            wait_for(lambda: sum(t > promoted_at for t, _, _ in results) >= 4, 30, "requests after promotion")
            stop.set()
            for t in threads:
                t.join(30)
            for c in clients:
                c.close()
    finally:
        stop.set()
        worker.stop()
    assert not errors, errors
    assert {v for t, _, v in results if t > promoted_at} == {2}
    assert {v for _, _, v in results} == {0, 1, 2}
    decisions = [r["decision"] for r in worker.events("rollout_decision")]
    assert decisions.count("rollback") == 1 and decisions.count("promote") == 1


@pytest.mark.timeout(240)
def test_failing_candidate_rolled_back_by_the_error_guardrail(
    kafka_bootstrap: str, topic_prefix: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No samples at all: the replicas' per-version failure counts alone roll the candidate back."""
    from safetensors.torch import load_file

    from services.checkpoints.store import CheckpointStore
    from services.serving.engines.transformers import TransformersEngine
    from services.serving.server import ServerThread

    model = "canary-failing"
    store = CheckpointStore(tmp_path / "checkpoints")
    v0 = load_file(tiny_model_dir / "model.safetensors")
    store.publish(model, 0, v0, parent_version=None, full=True)
    ev1 = store.publish(
        model, 1, {k: t * 1.1 if "mlp" in k else t for k, t in v0.items()}, parent_version=0, full=False
    )

    # The fault: every batch on version 1 fails in the engine (the client gets a 500).
    run_batch = TransformersEngine._run_batch

    def failing(self: TransformersEngine, batch: list) -> None:
        if batch and batch[0].version == 1:
            raise RuntimeError("injected fault of candidate 1")
        run_batch(self, batch)

    monkeypatch.setattr(TransformersEngine, "_run_batch", failing)

    worker = Worker(
        kafka_bootstrap,
        topic_prefix,
        f"g-{uuid.uuid4().hex[:8]}",
        tmp_path / "worker.log",
        RLFEED_ROLLOUT_ENABLED="true",
        RLFEED_ROLLOUT_CANDIDATE_TRAFFIC_FRAC=str(TRAFFIC),
        RLFEED_ROLLOUT_DECIDE_INTERVAL_S="0.3",
        RLFEED_ROLLOUT_MIN_ERRORS="3",
    )
    base = _replica_settings(kafka_bootstrap, topic_prefix, tiny_model_dir, model, tmp_path, store.root)
    ok: list[tuple[float, str, int]] = []  # (time, user, version)
    failed: list[tuple[float, str, int]] = []  # (time, user, status)
    stop = threading.Event()
    try:
        with (
            ServerThread(base.model_copy(update={"replica_id": "failing-a"})) as a,
            ServerThread(base.model_copy(update={"replica_id": "failing-b"})) as b,
        ):
            replicas = [a, b]
            clients = [openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0) for s in replicas]

            def load(i: int) -> None:
                for n in itertools.count():
                    if stop.is_set():
                        return
                    user = USERS[(i * 7 + n) % len(USERS)]
                    try:
                        r = clients[n % 2].completions.create(model=model, prompt=f"hi {n}", max_tokens=3, user=user)
                        ok.append((time.monotonic(), user, r.model_extra["policy_version"]))
                    except openai.APIStatusError as exc:
                        failed.append((time.monotonic(), user, exc.status_code))

            threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(2)]
            for t in threads:
                t.start()
            worker.wait_log("rollout_ready", timeout_s=60)

            _load_candidate(replicas, worker, kafka_bootstrap, topic_prefix, ev1)
            rollback = worker.wait_log("rollout_decision", lambda r: r["decision"] == "rollback", timeout_s=60)
            wait_for(lambda: _candidate_everywhere(replicas, None), 30, "the rollback to reach both replicas")
            dropped_at = time.monotonic()
            wait_for(lambda: sum(t > dropped_at for t, _, _ in ok) >= 6, 30, "requests after the rollback")
            stop.set()
            for t in threads:
                t.join(30)
            for c in clients:
                c.close()
    finally:
        stop.set()
        worker.stop()
    assert "requests failed" in rollback["reason"], rollback
    assert failed and {status for _, _, status in failed} == {500}
    split = Split(0, 1, TRAFFIC)
    assert all(split.wants_candidate(model, u) for _, u, _ in failed)  # only the candidate's users failed
    assert not [f for f in failed if f[0] > dropped_at]
    assert {v for t, _, v in ok if t > dropped_at} == {0}
    decisions = [r["decision"] for r in worker.events("rollout_decision")]
    assert decisions.count("rollback") == 1 and "promote" not in decisions


SLOW_ANSWER_S = 1.5
"""How long the slow candidate's answers are held back (the injected fault of the latency test)."""


def _hold_answers(job: Any, delay_s: float) -> None:
    """Deliver `job`'s output `delay_s` late on the event loop, without holding the engine thread."""
    loop, queue = job._loop, job._queue

    def post(delta: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is reading any more
            loop.call_soon_threadsafe(loop.call_later, delay_s, queue.put_nowait, delta)

    job._post = post


@pytest.mark.timeout(240)
def test_slow_candidate_rolled_back_by_the_latency_guardrail(
    kafka_bootstrap: str, topic_prefix: str, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No samples at all: the replicas' per-version latency histograms alone roll a slow candidate back.

    How only the candidate is made slow: its batches run as fast as stable's, but each of
    its answers is handed to the HTTP handler `SLOW_ANSWER_S` late, on the event loop
    (`_hold_answers`), so the engine thread and its generation lock are free meanwhile and
    the stable arm's requests are not queued behind the candidate's. A candidate that is
    slow inside the engine (more compute per token, a sleep in its batch) would hold the
    shared generation lock and slow the stable arm on the same replica too, and the
    guardrail compares the candidate with stable: with a 1.5 s sleep inside each candidate
    batch instead, this same load measured stable's p95 at 3.0 s and the candidate's at
    1.9 s (stable requests wait behind candidate batches), and nothing was rolled back.
    This test is about the guardrail's path (replica histograms -> replica-status.v1 -> the
    worker's decision -> rollouts.v1 -> replicas drop the candidate), not about that case.
    """
    from safetensors.torch import load_file

    from schemas.events import RolloutEvent
    from services.checkpoints.store import CheckpointStore
    from services.rollout.latency import GROWTH
    from services.serving.engines.transformers import TransformersEngine
    from services.serving.server import ServerThread

    model = "canary-slow"
    store = CheckpointStore(tmp_path / "checkpoints")
    v0 = load_file(tiny_model_dir / "model.safetensors")
    store.publish(model, 0, v0, parent_version=None, full=True)
    ev1 = store.publish(
        model, 1, {k: t * 1.1 if "mlp" in k else t for k, t in v0.items()}, parent_version=0, full=False
    )

    run_batch = TransformersEngine._run_batch

    def slow_candidate(self: TransformersEngine, batch: list) -> None:
        if batch and batch[0].version == 1:
            for job in batch:
                _hold_answers(job, SLOW_ANSWER_S)
        run_batch(self, batch)

    monkeypatch.setattr(TransformersEngine, "_run_batch", slow_candidate)

    worker = Worker(
        kafka_bootstrap,
        topic_prefix,
        f"g-{uuid.uuid4().hex[:8]}",
        tmp_path / "worker.log",
        RLFEED_ROLLOUT_ENABLED="true",
        RLFEED_ROLLOUT_CANDIDATE_TRAFFIC_FRAC=str(TRAFFIC),
        RLFEED_ROLLOUT_DECIDE_INTERVAL_S="0.3",
        RLFEED_ROLLOUT_LATENCY_MIN_REQUESTS="10",
        RLFEED_ROLLOUT_MAX_LATENCY_P95_RATIO="2.0",
        RLFEED_ROLLOUT_LATENCY_P95_SLACK_MS="100",
    )
    base = _replica_settings(
        kafka_bootstrap, topic_prefix, tiny_model_dir, model, tmp_path, store.root, candidate_status_interval_s=0.5
    )
    ok: list[tuple[float, float, str, int]] = []  # (sent, answered, user, version)
    errors: list[BaseException] = []
    stop = threading.Event()
    try:
        with (
            ServerThread(base.model_copy(update={"replica_id": "slow-a"})) as a,
            ServerThread(base.model_copy(update={"replica_id": "slow-b"})) as b,
        ):
            replicas = [a, b]
            clients = [openai.OpenAI(base_url=s.base_url, api_key="x", max_retries=0) for s in replicas]

            def load(i: int) -> None:
                for n in itertools.count():
                    if stop.is_set():
                        return
                    user = USERS[(i * 7 + n) % len(USERS)]
                    try:
                        sent = time.monotonic()
                        r = clients[n % 2].completions.create(model=model, prompt=f"hi {n}", max_tokens=3, user=user)
                        ok.append((sent, time.monotonic(), user, r.model_extra["policy_version"]))
                    except BaseException as exc:
                        errors.append(exc)
                        return

            threads = [threading.Thread(target=load, args=(i,), daemon=True) for i in range(4)]
            for t in threads:
                t.start()
            worker.wait_log("rollout_ready", timeout_s=60)

            _load_candidate(replicas, worker, kafka_bootstrap, topic_prefix, ev1)
            rollback = worker.wait_log("rollout_decision", lambda r: r["decision"] == "rollback", timeout_s=90)
            wait_for(lambda: _candidate_everywhere(replicas, None), 30, "the rollback to reach both replicas")
            dropped_at = time.monotonic()
            wait_for(lambda: sum(t > dropped_at for t, _, _, _ in ok) >= 6, 30, "requests after the rollback")
            stop.set()
            for t in threads:
                t.join(30)
            for c in clients:
                c.close()
    finally:
        stop.set()
        worker.stop()
    assert not errors, errors
    assert "latency p95" in rollback["reason"], rollback
    # The decision as the replicas read it: the last rollouts.v1 event of the model.
    latest: RolloutEvent = read_latest(kafka_bootstrap, ROLLOUTS.full_name(topic_prefix))[model][0]
    assert latest.decision == "rollback" and latest.stable_version == 0 and latest.candidate_version is None
    assert latest.reason.startswith("guardrail: latency p95"), latest.reason
    assert latest.arms["rollout.decided_version"] == 1
    cand_p95, stable_p95 = latest.arms["candidate.latency_p95_ms"], latest.arms["stable.latency_p95_ms"]
    assert latest.arms["candidate.latency_n"] >= 10 and latest.arms["stable.latency_n"] >= 10
    assert cand_p95 >= SLOW_ANSWER_S * 1000 / GROWTH  # the histogram estimate is within one bucket
    assert cand_p95 > 2.0 * stable_p95 + 100.0
    assert latest.arms["candidate.failures"] == 0  # the error guardrail had nothing to say
    # Only the candidate's users were slow: every answer on version 1 was held back.
    on_candidate = [(s, e) for s, e, _, v in ok if v == 1]
    assert on_candidate and all(e - s >= SLOW_ANSWER_S for s, e in on_candidate)
    assert {v for s, _, _, v in ok if s > dropped_at} == {0}
    decisions = [r["decision"] for r in worker.events("rollout_decision")]
    assert decisions.count("rollback") == 1 and "promote" not in decisions
