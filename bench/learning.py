"""Does the loop learn? Run the whole demo for a fixed time and seed, print one JSON object.

    .venv/bin/python bench/learning.py --minutes 30 [--preference MODULE:CALLABLE]

It runs `rlfeed demo` (stack, stream worker, trainer, two replicas, simulated users with
the hidden preference) in a fresh home directory and reports, from what the users did:
the accept rate of the first and the last policy version they were served, with 95%
Wilson intervals, the relative improvement, versions published and refused by the gate,
samples trained, and the stream's and ClickHouse's counts. The baseline is version 0
(the untrained model) measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path

# Run as a script, bench/ is first on sys.path and bench/streams.py would shadow the
# `streams` package that the demo imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import orjson  # noqa: E402

from services.demo.runner import run  # noqa: E402
from services.demo.settings import DemoSettings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0, help="how long the users are active")
    parser.add_argument("--preference", default="services.simulator.preference:concise")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", help="the policy model (default: <repo>/.rlfeed/models/smollm2-135m-instruct)")
    parser.add_argument("--home", help="keep the run's home (logs, report, ClickHouse) here instead of a temp dir")
    args = parser.parse_args()
    repo = Path(__file__).resolve().parents[1]
    model_dir = Path(args.model_dir) if args.model_dir else repo / ".rlfeed" / "models" / "smollm2-135m-instruct"
    with contextlib.nullcontext(args.home) if args.home else tempfile.TemporaryDirectory(prefix="rlfeed-") as home:
        settings = DemoSettings(
            home_dir=Path(home),
            demo_model_dir=model_dir,
            demo_duration_s=args.minutes * 60,
            sim_preference=args.preference,
            sim_seed=args.seed,
        )
        report = run(settings, print_report=False)
    summary = report.get("summary", {})
    trainer = report.get("trainer") or {}
    out = {
        "bench": "learning",
        "minutes": args.minutes,
        "preference": args.preference,
        "seed": args.seed,
        "first_version": summary.get("first_version"),
        "first_accept_rate": (summary.get("first") or {}).get("accept_rate"),
        "first_accept_ci95": (summary.get("first") or {}).get("accept_ci95"),
        "last_version": summary.get("last_version"),
        "last_accept_rate": (summary.get("last") or {}).get("accept_rate"),
        "last_accept_ci95": (summary.get("last") or {}).get("accept_ci95"),
        "relative_improvement": summary.get("relative_improvement"),
        "versions_served": summary.get("versions_served"),
        "versions_published": len([v for v in report["published_versions"]["published"] if v]),
        "versions_refused_by_gate": report["published_versions"]["gate_refused"],
        "samples_trained": trainer.get("samples"),
        "feedback_to_training_ms_p50": trainer.get("feedback_to_training_ms_p50"),
        "feedback_to_training_ms_p99": trainer.get("feedback_to_training_ms_p99"),
        "publish_to_serving_s": report.get("publish_to_serving_s"),
        "answers": report.get("answers"),
        "clickhouse_rows": report.get("clickhouse_rows"),
        "per_version": report.get("versions"),
    }
    print(orjson.dumps(out).decode())


if __name__ == "__main__":
    main()
