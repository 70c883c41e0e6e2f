"""Faults under load, CI-sized (RLFEED_CHAOS_SCALE=small; `medium` and `large` add the
trainer and a replica; bench/chaos.py prints the figures).

Traffic flows through the gateway while the stream worker, the stack (sink and ClickHouse
owner) and the gateway (from `medium` up also the trainer and a serving replica with the
tiny model) are each killed with SIGKILL and restarted, and the broker is stopped and
restarted on its data directory. Afterwards every accepted feedback event is in exactly
one sample or one dead letter, ClickHouse holds each event once, the restarted trainer
resumed from its checkpoint and the replica serves the newest published version.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.loop import run_chaos, scale

pytestmark = [pytest.mark.timeout(900), pytest.mark.chaos]


def test_kill9_each_process_and_restart_the_broker_loses_and_doubles_nothing(
    tmp_path: Path, repo_root: Path, request: pytest.FixtureRequest
) -> None:
    size = scale()
    model_dir = request.getfixturevalue("tiny_model_dir") if size["model"] else None
    report = run_chaos(tmp_path / "home", repo_root, size["events"], size["rate_per_s"], model_dir, size["together"])
    print("chaos report", report)
    killed = {"streams": 1, "stack": 1, "gateway": 1, "broker": 1}
    if model_dir is not None:
        killed |= {"trainer": 1, "replica": 1}
    assert report["processes_killed"] == killed, report
    assert report["dead_children_before_stop"] == [], report
    assert report["accepted"] == report["events_sent"] >= size["events"], report  # clients retry until accepted
    assert report["client_retries"] > 0, report  # the gateway and broker faults hit live traffic
    assert report["join_settled"] and report["lost"] == 0, report
    assert report["duplicated"] == 0, report
    assert report["in_samples"] + report["dead_lettered"] == report["accepted"], report
    ch = report["clickhouse"]
    assert ch["feedback"]["final"] == ch["feedback"]["distinct"] == report["accepted"], report
    assert ch["generations"]["final"] == ch["generations"]["distinct"] == report["accepted_generations"], report
    assert ch["samples"]["final"] == ch["samples"]["distinct"] == report["trained_samples"], report
    if model_dir is None:
        return
    # The restarted trainer resumed from its checkpoint, and the replica serves the last version.
    trainer = report["trainer"]
    assert trainer["starts"] == 2 and trainer["resumed_from_checkpoint"] == 1, report
    assert trainer["resumed_steps"][0] > 0, report
    assert report["replica_serves_latest"] and report["latest_published"] >= 1, report
