"""kill -9 the trainer after it trained past its checkpoint; the restart resumes at the
checkpointed offsets: every sample is covered exactly once by the surviving steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson

from schemas.topics import SAMPLES
from services.trainer import state
from tests.trainer_helpers import MODEL, end_offsets, make_samples, produce


def _ledger(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _wait(cond, timeout_s: float, what: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"trainer exited with {proc.returncode} while waiting for {what}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_kill9_resumes_at_checkpointed_offsets(tmp_path, tiny_model_dir, kafka_bootstrap, topic_prefix, repo_root):
    topic = SAMPLES.full_name(topic_prefix)
    home = tmp_path / "home"
    env = {
        **os.environ,
        "RLFEED_KAFKA_URL": f"kafka://{kafka_bootstrap}",
        "RLFEED_TOPIC_PREFIX": topic_prefix,
        "RLFEED_HOME_DIR": str(home),
        "RLFEED_MODEL_NAME": MODEL,
        "RLFEED_MODEL_DIR": str(tiny_model_dir),
        "RLFEED_TRAINER_BATCH_SIZE": "4",
        "RLFEED_TRAINER_BATCH_WAIT_S": "0.3",
        "RLFEED_CHECKPOINT_EVERY_STEPS": "4",
        "RLFEED_CHECKPOINT_EVERY_S": "1000",
        "RLFEED_PUBLISH_EVERY_S": "0",
        "RLFEED_LR": "1e-3",
        "RLFEED_LOG_LEVEL": "info",
    }
    state_dir = state.model_state_dir(home / "trainer", MODEL)
    ledger = state_dir / "ledger.jsonl"
    cmd = [sys.executable, "-m", "services.trainer.main"]

    produce(kafka_bootstrap, topic, make_samples(24, seed=1))
    log1 = open(tmp_path / "run1.log", "wb")  # noqa: SIM115
    p1 = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=log1, stderr=subprocess.STDOUT)
    try:
        # Past a checkpoint, with at least one step trained after it.
        _wait(lambda: state.latest(state_dir) is not None and len(_ledger(ledger)) > 4, 90, "steps past step 4", p1)
    finally:
        p1.send_signal(signal.SIGKILL)
        p1.wait(10)
        log1.close()
    ckpt, _, _ = state.load(state.latest(state_dir))
    run1 = _ledger(ledger)
    assert ckpt.step == 4 and len(run1) > ckpt.step, (ckpt.step, len(run1))

    produce(kafka_bootstrap, topic, make_samples(16, seed=2))
    ends = {p: o for p, o in end_offsets(kafka_bootstrap, topic, SAMPLES.partitions).items() if o}

    def covered() -> bool:
        pos: dict[int, int] = {}
        for e in _ledger(ledger)[len(run1) :]:
            for p, (_, hi) in e["ranges"].items():
                pos[int(p)] = max(pos.get(int(p), 0), hi)
        return all(pos.get(p, ckpt.offsets.get(p, 0)) >= o for p, o in ends.items())

    log2 = open(tmp_path / "run2.log", "wb")  # noqa: SIM115
    p2 = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=log2, stderr=subprocess.STDOUT)
    try:
        _wait(covered, 90, "the restarted trainer to consume everything", p2)
        p2.send_signal(signal.SIGTERM)
        assert p2.wait(60) == 0
    finally:
        if p2.poll() is None:
            p2.kill()
        log2.close()

    lines = [orjson.loads(x) for x in (tmp_path / "run2.log").read_bytes().splitlines() if x.startswith(b"{")]
    resumed = next(x for x in lines if x.get("event") == "resumed")
    assert {int(k): v for k, v in resumed["offsets"].items()} == ckpt.offsets
    assert resumed["step"] == ckpt.step

    run2 = _ledger(ledger)[len(run1) :]
    assert run2[0]["step"] == ckpt.step + 1
    surviving = [e for e in run1 if e["step"] <= ckpt.step] + run2
    # Every offset of every partition covered exactly once, from 0 to the end.
    for p, end in ends.items():
        spans = sorted(tuple(e["ranges"][str(p)]) for e in surviving if str(p) in e["ranges"])
        cursor = 0
        for lo, hi in spans:
            assert lo == cursor, f"partition {p}: gap or overlap at {cursor} ({spans})"
            cursor = hi
        assert cursor == end
    final, _, _ = state.load(state.latest(state_dir))
    assert final.offsets == ends
    assert final.step == run2[-1]["step"]
    trained = sum(e["samples"] for e in surviving)
    assert trained + final.counters.get("heldout", 0) == 40
