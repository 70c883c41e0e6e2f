"""The dashboard end to end: seeded ClickHouse -> rollups -> HTTP API -> alerts -> headless Chromium.

The database is seeded with realistic rows built by the sink's own row functions from
real events: four policy versions (v3 regresses on reward, spikes KL and emits empty /
repeated completions), every feedback kind, a dead-letter burst, and a replica stuck on v2.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from schemas.events import DeadLetterEvent, ModelUpdateEvent, ReplicaStatusEvent, SampleEvent
from services.clickhouse import migrations
from services.clickhouse.client import connect
from services.dashboard.monitor import Monitor
from services.dashboard.panels import Store
from services.dashboard.server import DashboardServer, build_app
from services.dashboard.settings import DashboardSettings
from services.sink.rows import SPECS
from tests.factories import feedback, generation

MODEL = "smollm2-135m-instruct"
MEAN_REWARD = {0: 0.2, 1: 0.3, 2: 0.5, 3: -0.1}
KL = {1: 0.010, 2: 0.012, 3: 0.30}
SAMPLES_PER_VERSION = 60
DEAD_LETTERS = 30
CHROMIUM_APT = "apt-get install -y chromium chromium-driver"


def _insert(client, events) -> None:
    """Insert events the way the sink does: one row function per topic."""
    by_table: dict[str, list[dict]] = {}
    for topic, e in events:
        spec = SPECS[topic]
        by_table.setdefault(spec.table, []).append(spec.as_dict(e))
    for table, rows in by_table.items():
        columns = list(rows[0])
        client.insert(table, [[r[c] for c in columns] for r in rows], column_names=columns)


def seed(client) -> None:
    rng = random.Random(7)
    now_ms = int(time.time() * 1000)
    events: list[tuple[str, object]] = []
    sha = "0" * 64
    for v in range(1, 4):
        events.append(
            (
                "model-updates.v1",
                ModelUpdateEvent(
                    model=MODEL,
                    version=v,
                    parent_version=v - 1,
                    artifact_kind="full",
                    artifact_url=f"{MODEL}/v{v}.safetensors",
                    sha256=sha,
                    size_bytes=1000,
                    eval_metrics={"kl_parent": KL[v], "heldout_reward": MEAN_REWARD[v - 1], "distinct_frac": 0.9},
                    event_time_ms=now_ms - (40 - 10 * v) * 60_000,
                ),
            )
        )
    kinds = [("thumb", 1.0), ("thumb", -1.0), ("rating", 4.0), ("accept", None), ("reject", None), ("copy", None)]
    for v in range(4):
        for i in range(SAMPLES_PER_VERSION):
            t = now_ms - (38 - 9 * v) * 60_000 + i * 5_000
            gid = f"g{v}-{i}"
            degenerate = "" if i % 3 == 0 else "Same answer."  # v3 hacks the reward: empty / repeated
            completion = degenerate if v == 3 else f"Answer {i} from v{v}."
            tokens = list(range(1, 2 + (i % 7))) if completion else []
            events.append(
                (
                    "generations.v1",
                    generation(
                        gid,
                        model=MODEL,
                        policy_version=v,
                        completion=completion,
                        completion_token_ids=tokens,
                        completion_logprobs=[-0.5] * len(tokens),
                        latency_ms=50.0 + rng.random() * 100 + v * 20,
                        event_time_ms=t,
                    ),
                )
            )
            kind, value = kinds[i % len(kinds)]
            events.append(("feedback.v1", feedback(gid, kind=kind, value=value, event_time_ms=t + 1000)))
            accept = rng.random() < (0.3 + 0.15 * v if v < 3 else 0.1)
            reward = MEAN_REWARD[v] + rng.gauss(0, 0.1)
            events.append(
                (
                    "samples.v1",
                    SampleEvent(
                        generation_id=gid,
                        model=MODEL,
                        policy_version=v,
                        prompt="Suggest a name for a cat.",
                        completion=completion,
                        prompt_token_ids=[1, 2, 3],
                        completion_token_ids=tokens,
                        completion_logprobs=[-0.5] * len(tokens),
                        reward=reward,
                        reward_components={"accept": 0.75} if accept else {"reject": -0.25},
                        feedback_event_ids=[uuid.uuid4().hex],
                        settle_reason="terminal",
                        user_id="user-1",
                        generated_at_ms=t,
                        event_time_ms=t + 2000,
                    ),
                )
            )
    for i in range(DEAD_LETTERS):
        events.append(
            (
                "dlq.v1",
                DeadLetterEvent(
                    source_topic="generations.v1",
                    source_partition=0,
                    source_offset=i,
                    original_b64="e30=",
                    error_field="completion_logprobs" if i % 2 else None,
                    reason="1 validation error for GenerationEvent\nlogprobs: length mismatch",
                    rejected_by="sink",
                    event_time_ms=now_ms - (i % 3) * 60_000,
                ),
            )
        )
    for replica, version in (("replica-a", 3), ("replica-b", 2)):
        events.append(
            (
                "replica-status.v1",
                ReplicaStatusEvent(
                    replica_id=replica,
                    model=MODEL,
                    version=version,
                    state="serving",
                    engine="transformers",
                    event_time_ms=now_ms - 60_000,
                ),
            )
        )
    # replica-b lost events during the window (a full buffer, then a restart resets its
    # counts); replica-c lost 4, then 6 more, one minute apart; replica-a lost none.
    for replica, ago_ms, dropped in (
        ("replica-a", 30_000, {}),
        ("replica-b", 50_000, {"buffer_full": 5}),
        ("replica-b", 40_000, {"buffer_full": 12, "delivery_failed": 2}),
        ("replica-b", 30_000, {"buffer_full": 1}),
        ("replica-c", 180_000, {}),
        ("replica-c", 120_000, {"delivery_failed": 4}),
        ("replica-c", 60_000, {"delivery_failed": 10}),
    ):
        events.append(
            (
                "replica-status.v1",
                ReplicaStatusEvent(
                    replica_id=replica,
                    model=MODEL,
                    version=2 if replica == "replica-b" else 3,
                    state="serving",
                    engine="transformers",
                    events_dropped=dropped,
                    event_time_ms=now_ms - ago_ms,
                ),
            )
        )
    _insert(client, events)
    ts = time.time()
    lag_rows = [
        [datetime.fromtimestamp(ts - 60 * k, tz=UTC), "rlfeed-sink", "generations.v1", 0, 100, 100 + 10 * k, 10 * k]
        for k in range(5)
    ]
    client.insert(
        "consumer_lag",
        lag_rows,
        column_names=["ts", "consumer_group", "topic", "partition", "committed", "high_watermark", "lag"],
    )


@pytest.fixture(scope="module")
def dashboard(clickhouse_url: str) -> Iterator[dict]:
    """A seeded database, its own dashboard client, one alert round, and the server on a free port.

    chdb opens one data path per process, so this shares the session's (a fresh database in it).
    """
    url = clickhouse_url
    database = f"t_{uuid.uuid4().hex[:10]}"
    writer = connect(url, database)
    migrations.apply(writer)
    seed(writer)
    settings = DashboardSettings(dashboard_port=0, dashboard_refresh_s=2.0)
    store = Store(connect(url, database))
    monitor = Monitor(store, settings)
    alerts = monitor.round()
    server = DashboardServer(build_app(store, monitor, settings), "127.0.0.1", 0).start()
    try:
        yield {"url": server.url, "alerts": alerts, "writer": writer, "monitor": monitor}
    finally:
        server.stop()
        writer.command(f"DROP DATABASE IF EXISTS {database}")


def test_panels_show_the_seeded_run(dashboard: dict) -> None:
    r = httpx.get(dashboard["url"] + "api/panels", timeout=30)
    assert r.status_code == 200
    panels = r.json()["panels"]
    errors = {k: p["error"] for k, p in panels.items() if p["error"]}
    assert not errors, errors

    reward = {s["name"]: s["points"] for s in panels["reward_by_version"]["series"]}
    assert set(reward) == {"v0", "v1", "v2", "v3"}
    for v, mean in MEAN_REWARD.items():
        points = reward[f"v{v}"]
        assert abs(sum(y for _, y in points) / len(points) - mean) < 0.1

    accept = {p["x"]: p for p in panels["accept_rate_by_version"]["points"]}
    assert sorted(accept) == [0, 1, 2, 3]
    assert all(p["n"] == SAMPLES_PER_VERSION and p["lo"] <= p["y"] <= p["hi"] for p in accept.values())
    assert accept[3]["y"] < accept[2]["y"]

    mix = {s["name"]: sum(y for _, y in s["points"]) for s in panels["feedback_mix"]["series"]}
    assert mix == {"thumb": 80, "rating": 40, "accept": 40, "reject": 40, "copy": 40}

    letters = sum(y for s in panels["dead_letters"]["series"] for _, y in s["points"])
    assert letters == DEAD_LETTERS
    assert any("completion_logprobs" in s["name"] for s in panels["dead_letters"]["series"])

    latency = {s["name"]: s["points"] for s in panels["latency"]["series"]}
    assert set(latency) == {"p50", "p95", "p99"}
    assert all(50 <= y <= 250 for pts in latency.values() for _, y in pts)

    throughput = {s["name"]: s["points"] for s in panels["throughput"]["series"]}
    assert sum(y for _, y in throughput["samples/s"]) * 60 == pytest.approx(4 * SAMPLES_PER_VERSION)

    bars = {b["label"]: b for b in panels["replica_versions"]["bars"]}
    assert bars["replica-a"]["value"] == 3 and bars["replica-a"]["ok"]
    assert bars["replica-b"]["value"] == 2 and not bars["replica-b"]["ok"]

    lost = {s["name"]: s["points"] for s in panels["events_lost"]["series"]}
    assert [y for _, y in lost["replica-c"]] == [4, 6]  # per minute, from cumulative counts
    assert "replica-a" not in lost

    completion = panels["completion_by_version"]
    fractions = {s["name"]: dict((int(x), y) for x, y in s["points"]) for s in completion["series2"]}
    assert fractions["empty"][3] == pytest.approx(1 / 3, abs=0.02)
    assert fractions["empty"][2] == 0
    assert fractions["distinct"][3] < 0.1 < 0.9 < fractions["distinct"][2]

    kl = {int(x): y for s in panels["trainer_gate"]["series"] for x, y in s["points"]}
    assert kl == pytest.approx(KL)
    lag = panels["consumer_lag"]["series"]
    assert lag[0]["name"] == "rlfeed-sink" and max(y for _, y in lag[0]["points"]) == 40


def test_alerts_fire_for_the_seeded_faults(dashboard: dict) -> None:
    r = httpx.get(dashboard["url"] + "api/alerts", timeout=30)
    assert r.status_code == 200
    body = r.json()
    firing = {(a["rule"], a["key"]) for a in body["firing"]}
    assert firing == {
        ("reward_regression", f"{MODEL}/v3"),
        ("kl_spike", f"{MODEL}/v3"),
        ("dead_letter_spike", "all"),
        ("replica_stuck", f"{MODEL}/replica-b"),
        ("replica_dropping_events", f"{MODEL}/replica-b"),
        ("replica_dropping_events", f"{MODEL}/replica-c"),
    }
    drops = next(a for a in body["firing"] if a["rule"] == "replica_dropping_events")
    assert drops["details"]["by_reason"] == {"buffer_full": 1}  # the last count, after the restart
    recorded = {(a["rule"], a["key"]) for a in body["recent"] if a["status"] == "firing"}
    assert recorded == firing
    # A second round with nothing new records nothing more.
    dashboard["monitor"].round()
    body = httpx.get(dashboard["url"] + "api/alerts", timeout=30).json()
    assert len(body["recent"]) == len(firing)


def test_health_and_page(dashboard: dict) -> None:
    assert httpx.get(dashboard["url"] + "health", timeout=30).json()["ok"] is True
    page = httpx.get(dashboard["url"], timeout=30).text
    assert "<svg" not in page  # charts are drawn by the page's own script
    assert "http://" not in page.replace('"http://www.w3.org/2000/svg"', "")  # nothing loaded from elsewhere


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.fail(f"Chromium is not installed; the browser test needs it: {CHROMIUM_APT}")
    return path


def test_page_in_headless_chromium(dashboard: dict) -> None:
    """The page loads without console errors, draws every seeded chart, and shows the alert banner."""
    chromium = _chromium()
    out = Path(tempfile.mkdtemp(prefix="rlfeed-dashboard-"))
    common = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=8000",
        "--window-size=1280,2600",
    ]
    dom = subprocess.run(
        [*common, f"--user-data-dir={out / 'profile-dom'}", "--dump-dom", dashboard["url"]],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not [line for line in console if "Uncaught" in line or "rror" in line], console
    html = dom.stdout
    assert 'data-errors="0"' in html
    assert 'data-loaded="0"' not in html, "the page never finished loading its data"
    points = dict(re.findall(r'id="panel-([a-z_]+)" data-points="(\d+)"', html))
    expected = {
        "reward_by_version",
        "accept_rate_by_version",
        "feedback_mix",
        "throughput",
        "latency",
        "replica_versions",
        "events_lost",
        "dead_letters",
        "consumer_lag",
        "completion_by_version",
        "trainer_gate",
        "rollout_arms",
    }
    assert set(points) == expected
    # no canary rollout runs in this scenario: its panel renders empty
    assert all(int(n) > 0 for name, n in points.items() if name != "rollout_arms"), points
    assert html.count('class="pt"') >= sum(int(n) for n in points.values())
    assert 'id="alert-banner" role="alert" class="firing"' in html or 'class="firing"' in html
    assert "reward_regression" in html

    shot = out / "dashboard.png"
    subprocess.run(
        [*common, f"--user-data-dir={out / 'profile-shot'}", f"--screenshot={shot}", dashboard["url"]],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert shot.exists() and shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")
