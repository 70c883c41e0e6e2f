"""What an idle stack costs: CPU of `rlfeed up` (embedded broker, sink) and `rlfeed streams`
while no events flow.

The embedded broker answers an empty fetch at once, so a consumer at the end of its
partitions would fetch thousands of times a second (services/kafka/idle.py). This bench
starts the two commands twice, with `kafka_idle_pause_ms` at its default and at 0 (the
baseline: no pauses), lets them settle, reads each process's CPU time from /proc over
`--window-s`, and prints one JSON object: cores per process and in all for each run, and
`ratio` (paused / baseline total). Linux only (/proc).

    .venv/bin/python bench/idle.py
    .venv/bin/python bench/idle.py --settle-s 40 --window-s 30
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_seconds() -> dict[int, tuple[int, float, str]]:
    """pid -> (parent pid, user + system CPU seconds, command name) of every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            head, rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
            fields = rest.split()
            name = head.split("(", 1)[1]
            out[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, name)
        except (OSError, IndexError, ValueError):
            continue
    return out


def descendants(root: int, procs: dict[int, tuple[int, float, str]]) -> set[int]:
    """`root` and every process below it."""
    found, grew = {root}, True
    while grew:
        grew = False
        for pid, (parent, _, _) in procs.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def measure(pause_ms: int | None, settle_s: float, window_s: float) -> dict:
    """Cores used by the idle stack and stream worker with `kafka_idle_pause_ms` = `pause_ms`
    (None: the default)."""
    from services.kafka.embedded import free_port
    from services.stack import state as stack_state

    home = Path(tempfile.mkdtemp(prefix="rlfeed-idle-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLFEED_")}
    env |= {
        "RLFEED_HOME_DIR": str(home),
        "RLFEED_TOPIC_PREFIX": "idle.",
        "RLFEED_DASHBOARD_ENABLED": "false",
        "RLFEED_EMBEDDED_KAFKA_PORT": str(free_port()),
        "RLFEED_STREAMS_WEB_PORT": str(free_port()),
    }
    if pause_ms is not None:
        env["RLFEED_KAFKA_IDLE_PAUSE_MS"] = str(pause_ms)
    quiet = {"cwd": REPO, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    children: dict[str, subprocess.Popen] = {}
    try:
        children["up"] = subprocess.Popen([sys.executable, "-m", "services.cli", "up"], env=env, **quiet)
        deadline = time.monotonic() + 120
        while (up := stack_state.read(home)) is None:
            if time.monotonic() > deadline or children["up"].poll() is not None:
                raise RuntimeError("rlfeed up did not come up")
            time.sleep(0.5)
        env["RLFEED_KAFKA_URL"] = up["kafka_url"]
        children["streams"] = subprocess.Popen([sys.executable, "-m", "services.cli", "streams"], env=env, **quiet)
        time.sleep(settle_s)
        before = cpu_seconds()
        time.sleep(window_s)
        after = cpu_seconds()
        cores: dict[str, float] = {}
        for label, child in children.items():
            for pid in descendants(child.pid, after):
                if pid in before:
                    key = f"{label}/{after[pid][2]}"
                    cores[key] = cores.get(key, 0.0) + (after[pid][1] - before[pid][1]) / window_s
        return {"cores": {k: round(v, 3) for k, v in cores.items()}, "total_cores": round(sum(cores.values()), 3)}
    finally:
        for child in reversed(children.values()):
            child.send_signal(signal.SIGINT)
        for child in reversed(children.values()):
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settle-s", type=float, default=25.0, help="wait this long after starting before measuring")
    ap.add_argument("--window-s", type=float, default=15.0, help="measure CPU over this long")
    args = ap.parse_args()
    paused = measure(None, args.settle_s, args.window_s)
    baseline = measure(0, args.settle_s, args.window_s)
    print(
        json.dumps(
            {
                "bench": "idle",
                "cpus": os.cpu_count(),
                "window_s": args.window_s,
                "paused": paused,
                "baseline_no_pauses": baseline,
                "ratio": round(paused["total_cores"] / baseline["total_cores"], 3) if baseline["total_cores"] else None,
            }
        )
    )


if __name__ == "__main__":
    main()
