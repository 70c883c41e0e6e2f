"""`rlfeed streams`: run one join worker until SIGINT or SIGTERM.

Several workers with the same `RLFEED_GROUP_ID` share the join partitions.
"""

from __future__ import annotations

import sys


def resolve_bootstrap(settings: object) -> str:
    """The broker's `host:port` list: `kafka_url`, else the running embedded broker."""
    from services.kafka.embedded import find_bootstrap

    bootstrap = find_bootstrap(settings.kafka_url, settings.home_dir)  # type: ignore[attr-defined]
    if bootstrap is None:
        raise SystemExit(
            "rlfeed streams: no Kafka broker. Start the embedded stack with `rlfeed up` "
            "or point RLFEED_KAFKA_URL at a running broker (kafka://host:port)."
        )
    return bootstrap


def logging_config(level: str) -> dict:
    """dictConfig for the Faust worker: JSON lines on stderr, Faust's own loggers quieter."""
    quiet = {"level": "WARNING"} if level.upper() in ("DEBUG", "INFO") else {"level": level.upper()}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "services.logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {name: quiet for name in ("faust", "mode", "aiokafka", "kafka", "aiohttp")},
    }


def main() -> None:
    """Read StreamsSettings from the environment, start the Faust worker, run until a signal."""
    from streams.settings import StreamsSettings

    settings = StreamsSettings()
    bootstrap = resolve_bootstrap(settings)

    import faust

    from services.kafka.topics import ensure_topics
    from streams.app import create_app
    from streams.hot_path import tune_gc

    ensure_topics(bootstrap, settings.topic_prefix)
    app = create_app(settings, bootstrap)
    tune_gc()  # the join's allocation pattern: see streams.hot_path.GC_THRESHOLDS
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level),
        redirect_stdouts=False,
        quiet=True,
    )
    worker.execute_from_commandline()


if __name__ == "__main__":
    sys.exit(main())
