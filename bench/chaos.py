"""Faults under load: the loop with the tiny model, every process killed with SIGKILL in
turn and restarted, the broker restarted, then the counts reconciled. Prints one JSON object:
events sent, accepted, dead-lettered, trained, in ClickHouse, lost (target 0), duplicated
(target 0), processes killed, recovery time per component (seconds from kill to ready).

    .venv/bin/python bench/chaos.py [--events 3000] [--rate 15] [--together] [--broker-kill9] [--home DIR]

The CI-sized run of the same harness is tests/chaos/ (RLFEED_CHAOS_SCALE=small).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.localmodel.build import build  # noqa: E402
from tests.chaos.loop import SCALES, run_chaos  # noqa: E402


def main() -> None:
    large = SCALES["large"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=large["events"], help="least events sent")
    parser.add_argument("--rate", type=float, default=large["rate_per_s"], help="events per second")
    parser.add_argument("--together", action="store_true", help="kill the model processes with others (faster)")
    parser.add_argument("--broker-kill9", action="store_true", help="SIGKILL the broker instead of stopping it")
    parser.add_argument("--no-model", action="store_true", help="leave out the trainer and the replica")
    parser.add_argument("--home", type=Path, default=None, help="where the run keeps its data (default: a temp dir)")
    args = parser.parse_args()
    model_dir = None if args.no_model else build(ROOT / ".rlfeed" / "test-cache" / "tiny-model", "tiny")
    home = args.home or Path(tempfile.mkdtemp(prefix="rlfeed-chaos-"))
    started = time.monotonic()
    report = run_chaos(
        home,
        ROOT,
        args.events,
        args.rate,
        model_dir,
        args.together,
        args.broker_kill9,
        say=lambda s: print(s, file=sys.stderr),
    )
    report["elapsed_s"] = round(time.monotonic() - started, 1)
    report["home"] = str(home)
    report["command"] = " ".join(sys.argv)
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
