"""`rlfeed rollout status|promote|abort`: what the CLI runs (reads and writes rollouts.v1)."""

from __future__ import annotations

import sys

import orjson


def run(action: str, model: str | None, reason: str = "") -> int:
    """Print every model's rollout (status), or publish an operator's promote / abort for `model`.

    Exit status 1 when there is no broker, no rollout for the model, or nothing running."""
    from schemas.topics import ROLLOUTS
    from services.config import RlfeedSettings
    from services.kafka.embedded import find_bootstrap
    from services.rollout.control import operator_event, publish, read_latest, status_row

    settings = RlfeedSettings()
    bootstrap = find_bootstrap(settings.kafka_url, settings.home_dir)
    if bootstrap is None:
        print("no broker: run `rlfeed up` or set RLFEED_KAFKA_URL", file=sys.stderr)
        return 1
    latest = {m: ev for m, (ev, _) in read_latest(bootstrap, ROLLOUTS.full_name(settings.topic_prefix)).items()}
    if action == "status":
        rows = [status_row(ev) for m, ev in sorted(latest.items()) if model is None or m == model]
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    if model is None:
        if len(latest) != 1:
            print(f"--model is required (models: {sorted(latest)})", file=sys.stderr)
            return 1
        model = next(iter(latest))
    if model not in latest:
        print(f"model {model!r}: no rollout on {ROLLOUTS.name}", file=sys.stderr)
        return 1
    try:
        ev = operator_event(latest[model], action, reason)
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    publish(bootstrap, settings.topic_prefix, [ev])
    print(orjson.dumps(status_row(ev), option=orjson.OPT_INDENT_2).decode())
    return 0
