"""`rlfeed` as a user runs it: instant help, `rlfeed up` end to end, status and topics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from schemas.topics import ALL_TOPICS
from services.kafka.embedded import free_port

RLFEED = [sys.executable, "-m", "services.cli"]


def test_help_does_not_import_heavy_modules(repo_root: Path) -> None:
    code = (
        "import sys; from services.cli import parser\n"
        "try:\n    parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'transformers', 'faust', 'clickhouse_connect') if m in sys.modules]\n"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, check=True)
    assert out.stdout.strip().endswith("[]"), out.stdout


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLFEED_")}
    base = {"RLFEED_HOME_DIR": str(home), "RLFEED_STATUS_INTERVAL_S": "1", "RLFEED_DASHBOARD_PORT": str(free_port())}
    return env | base | extra


def _wait_for(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    return None


@pytest.mark.skipif(bool(os.environ.get("RLFEED_KAFKA_URL")), reason="runs the embedded broker itself")
def test_up_starts_the_embedded_stack_and_stops_cleanly(tmp_path: Path, repo_root: Path) -> None:
    port = free_port()
    env = _env(tmp_path / "home", RLFEED_EMBEDDED_KAFKA_PORT=str(port))
    proc = subprocess.Popen([*RLFEED, "up"], cwd=repo_root, env=env, stderr=subprocess.PIPE, text=True)
    try:

        def ready() -> dict | None:
            status = subprocess.run([*RLFEED, "status"], cwd=repo_root, env=env, capture_output=True, text=True)
            state = orjson.loads(status.stdout)["stack"] if status.returncode == 0 else None
            return state if isinstance(state, dict) and "clickhouse_rows" in state else None

        state = _wait_for(ready, 60)
        assert state, "rlfeed up did not become ready within 60 s"
        assert state["ready_s"] < 30
        assert state["kafka_url"] == f"kafka://127.0.0.1:{port}"

        kcat = subprocess.run(["kcat", "-L", "-b", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
        for topic in ALL_TOPICS:
            assert f'topic "{topic.name}" with {topic.partitions} partitions' in kcat.stdout

        topics = subprocess.run([*RLFEED, "topics"], cwd=repo_root, env=env, capture_output=True, text=True)
        assert topics.returncode == 0
        assert "feedback.v1" in topics.stdout and "compact" in topics.stdout

        broker_pid = orjson.loads((tmp_path / "home" / "broker.json").read_bytes())["pid"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not _alive(broker_pid), "the broker outlived `rlfeed up`"
        assert not (tmp_path / "home" / "stack.json").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(bool(os.environ.get("RLFEED_KAFKA_URL")), reason="runs the embedded broker itself")
def test_kill_9_of_up_takes_the_broker_with_it(tmp_path: Path, repo_root: Path) -> None:
    env = _env(tmp_path / "home", RLFEED_EMBEDDED_KAFKA_PORT=str(free_port()))
    proc = subprocess.Popen([*RLFEED, "up"], cwd=repo_root, env=env, stderr=subprocess.DEVNULL)
    state_file = tmp_path / "home" / "broker.json"
    assert _wait_for(state_file.exists, 60)
    broker_pid = orjson.loads(state_file.read_bytes())["pid"]
    proc.kill()
    proc.wait()
    assert _wait_for(lambda: not _alive(broker_pid), 10), "orphaned broker after kill -9"
    status = subprocess.run([*RLFEED, "status"], cwd=repo_root, env=env, capture_output=True, text=True)
    assert status.returncode == 1 and "not running" in status.stdout


def test_up_against_an_external_broker(kafka_bootstrap: str, tmp_path: Path, repo_root: Path) -> None:
    prefix = f"ext{os.getpid()}."
    env = _env(tmp_path / "home", RLFEED_KAFKA_URL=f"kafka://{kafka_bootstrap}", RLFEED_TOPIC_PREFIX=prefix)
    proc = subprocess.Popen([*RLFEED, "up"], cwd=repo_root, env=env, stderr=subprocess.DEVNULL)
    try:
        assert _wait_for((tmp_path / "home" / "stack.json").exists, 60)
        topics = subprocess.run([*RLFEED, "topics"], cwd=repo_root, env=env, capture_output=True, text=True)
        for topic in ALL_TOPICS:
            assert prefix + topic.name in topics.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): look at its state.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False
