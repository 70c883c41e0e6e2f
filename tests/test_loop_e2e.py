"""The whole loop, CI-sized: `rlfeed demo` with the tiny model for a few minutes.

Checks that versions are published and served (with canary rollouts, the demo's default:
each version first serves a slice of the users through rollouts.v1, then is promoted or
rolled back), that at least one rollout was decided and is in ClickHouse with its arms'
guardrail figures, and that the components' counters agree with each other and with
ClickHouse. Learning itself is
not asserted here (a random tiny model has nothing to learn in minutes); bench/learning.py
measures it with the real model.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest

from services.kafka.embedded import free_port

DURATION_S = 150


def _query_clickhouse(home: Path, repo_root: Path, sql: str) -> list:
    """Rows of `sql` on the demo's embedded ClickHouse, from a subprocess (chdb opens one
    data directory per process, and this one may hold the session's)."""
    code = (
        "import sys, orjson\n"
        "from services.config import RlfeedSettings\n"
        "from services.clickhouse.client import connect\n"
        "rows = connect(RlfeedSettings().embedded_clickhouse_url).query(sys.argv[1]).result_rows\n"
        "print(orjson.dumps(rows, default=str).decode())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLFEED_")} | {"RLFEED_HOME_DIR": str(home)}
    proc = subprocess.run(
        [sys.executable, "-c", code, sql], cwd=repo_root, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return orjson.loads(proc.stdout.strip().splitlines()[-1])


def _two_free_ports() -> int:
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two consecutive free ports")


@pytest.mark.timeout(DURATION_S + 300)  # the demo's own limit below, plus the ClickHouse queries
def test_demo_publishes_and_serves_versions_and_counts_agree(tmp_path: Path, tiny_model_dir: Path, repo_root) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLFEED_")}
    if os.environ.get("RLFEED_KAFKA_URL"):
        env["RLFEED_KAFKA_URL"] = os.environ["RLFEED_KAFKA_URL"]
    env |= {
        "RLFEED_HOME_DIR": str(home),
        "RLFEED_TOPIC_PREFIX": f"e2e{uuid.uuid4().hex[:6]}.",
        "RLFEED_DEMO_MODEL_DIR": str(tiny_model_dir),
        "RLFEED_DEMO_EMBEDDED_KAFKA_PORT": str(free_port()),
        "RLFEED_DEMO_FIRST_PORT": str(_two_free_ports()),
        "RLFEED_DASHBOARD_PORT": str(free_port()),
        "RLFEED_STREAMS_WEB_PORT": str(free_port()),
        "RLFEED_DEMO_PROGRESS_INTERVAL_S": "10",
        "RLFEED_DEMO_SETTLE_WINDOW_S": "2",
        "RLFEED_DEMO_PUBLISH_EVERY_STEPS": "1",
        "RLFEED_DEMO_TRAINER_BATCH_SIZE": "8",
        "RLFEED_DEMO_HELDOUT_EVERY": "4",
        "RLFEED_STATUS_INTERVAL_S": "2",
        "RLFEED_SIM_CONCURRENCY": "8",
        "RLFEED_SIM_MAX_TOKENS": "8",
        "RLFEED_SIM_FEEDBACK_DELAY_MAX_S": "0.5",
        # The tiny random model never stops on its own: let the gate judge the rest.
        "RLFEED_GATE_MIN_HELDOUT": "2",
        "RLFEED_GATE_MAX_TRUNCATED_FRAC": "1.0",
        "RLFEED_GATE_MAX_NEW_TOKENS": "8",
        "RLFEED_GATE_PROMPTS": "4",
        # Canary rollouts (on by default in the demo) decide within seconds here.
        "RLFEED_DEMO_ROLLOUT_MIN_SAMPLES_PER_ARM": "10",
        "RLFEED_DEMO_ROLLOUT_MAX_SAMPLES": "60",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--duration", str(DURATION_S)],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=DURATION_S + 240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = orjson.loads((home / "demo-report.json").read_bytes())
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((home / "logs").glob("*.log")))
    context = f"report: {report}\nlogs tail:\n{logs}"

    published = [v for v in report["published_versions"]["published"] if v]
    assert len(published) >= 2, context
    served = sorted(int(v) for v in report["versions"])
    assert len([v for v in served if v > 0]) >= 2, context
    assert report["errors"] == 0, context

    rows = report["clickhouse_rows"]
    streams = report["streams"]
    assert rows is not None and streams is not None, context
    # Every answer the users saw is one generation event, in the stream and in ClickHouse.
    assert rows["generations"] == report["answers"] == streams["generations"], context
    # Every feedback event sent reached the stream (duplicates included) and ClickHouse (deduplicated).
    assert streams["feedback"] == report["feedback_sent"], context
    assert rows["feedback"] == report["feedback_distinct"], context
    # Every sample the stream produced is in ClickHouse once; the trainer read them.
    assert rows["samples"] == streams["samples"] > 0, context
    assert rows["dead_letters"] == 0, context
    # Version 0 and at least two trained versions reached ClickHouse (the last ones may
    # have been published after the final count).
    assert 3 <= rows["model_updates"] <= len(published) + 1, context

    # Canary rollouts: versions started as candidates, at least one was decided, and the
    # decisions with their arms (guardrail figures included) reached ClickHouse.
    decided = [r for r in report["rollouts"] if r["decision"] in ("promote", "rollback") and r["decided"] > 0]
    assert decided, context
    in_clickhouse = _query_clickhouse(
        home,
        repo_root,
        "SELECT decision, toUInt32(arms['rollout.decided_version']) FROM rollouts FINAL "
        "WHERE decision != 'collect' AND candidate_version IS NULL AND mapContains(arms, 'candidate.n')",
    )
    assert {(d, v) for d, v in in_clickhouse} >= {(r["decision"], r["decided"]) for r in decided[:1]}, context
    served_requests = _query_clickhouse(
        home, repo_root, "SELECT max(requests) FROM rollout_arms WHERE arm = 'candidate'"
    )
    assert served_requests[0][0] > 0, context
