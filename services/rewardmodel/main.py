"""Entry points of `rlfeed rewardmodel train|serve` (settings first, heavy imports after)."""

from __future__ import annotations

import signal
import threading

from services.rewardmodel.settings import RewardModelSettings


def _bootstrap(settings: RewardModelSettings) -> str:
    """`host:port` of the broker: RLFEED_KAFKA_URL, else the running embedded broker."""
    from services.kafka.embedded import find_bootstrap

    bootstrap = find_bootstrap(settings.kafka_url, settings.home_dir)
    if bootstrap is None:
        raise SystemExit("no Kafka broker: start the embedded stack with `rlfeed up` or set RLFEED_KAFKA_URL")
    return bootstrap


def train() -> int:
    """Run the reward-model trainer until SIGINT or SIGTERM."""
    from services.logs import setup

    settings = RewardModelSettings()
    setup(settings.log_level)
    bootstrap = _bootstrap(settings)
    from services.kafka.topics import ensure_topics
    from services.rewardmodel.train import RewardModelTrainer

    ensure_topics(bootstrap, settings.topic_prefix)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    trainer = RewardModelTrainer(settings, bootstrap)
    try:
        trainer.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        trainer.close()
    return 0


def serve() -> int:
    """Run the scoring server until SIGINT or SIGTERM."""
    from services.logs import setup

    settings = RewardModelSettings()
    setup(settings.log_level)
    bootstrap = _bootstrap(settings)
    import uvicorn

    from services.rewardmodel.serve import Current, create_app, follow

    current = Current()
    current.load(settings, None)
    stop = threading.Event()
    threading.Thread(target=follow, args=(settings, bootstrap, current, stop), daemon=True).start()
    try:
        uvicorn.run(create_app(settings, current), host=settings.rm_serve_host, port=settings.rm_serve_port)
    finally:
        stop.set()
    return 0
