"""`rlfeed train` and `rlfeed rollback VERSION`.

Heavy imports (torch, transformers) happen inside the functions, so the CLI answers
`--help` fast.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from services import logs
from services.kafka.producers import producer_config
from services.trainer.settings import TrainerSettings

if TYPE_CHECKING:
    from services.trainer.distributed import Group

log = logging.getLogger("services.trainer")


def resolve_bootstrap(settings: TrainerSettings) -> str:
    """`host:port` of the broker: RLFEED_KAFKA_URL, else the running embedded broker."""
    from services.kafka.embedded import find_bootstrap

    bootstrap = find_bootstrap(settings.kafka_url, settings.home_dir)
    if bootstrap is None:
        raise SystemExit(
            f"no Kafka broker: none is running under {settings.home_dir.resolve()}; "
            "start the embedded stack with `rlfeed up` or set RLFEED_KAFKA_URL=kafka://host:port"
        )
    return bootstrap


def main() -> None:
    """Run the trainer until SIGINT/SIGTERM (the first stops after the current step and
    writes a checkpoint; a second exits at once)."""
    settings = TrainerSettings()
    logs.setup(settings.log_level)

    from services.trainer import distributed

    group = distributed.init_from_env(settings.trainer_dist_timeout_s)
    if group is not None and not group.is_leader:
        _follow(settings, group)
        return
    bootstrap = resolve_bootstrap(settings)

    from services.kafka.topics import ensure_topics
    from services.trainer.loop import Trainer

    ensure_topics(bootstrap, settings.topic_prefix)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        logs.event(log, "stopping", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    trainer = Trainer(settings, bootstrap, stop, group)
    logs.event(
        log,
        "trainer_started",
        model=settings.model_name,
        pid=os.getpid(),
        offsets={str(k): v for k, v in trainer.meta.offsets.items()},
        step=trainer.meta.step,
        published_version=trainer.meta.published_version,
    )
    trainer.run()  # logs `trainer_stopped` with its counters
    distributed.close(group)


def _follow(settings: TrainerSettings, group: Group) -> None:
    """Rank > 0 under torchrun: compute gradient shards until rank 0 stops. Signals are
    left to rank 0 (torchrun sends them to every rank): a follower leaves when told."""
    from services.trainer import distributed
    from services.trainer.loop import follow

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    follow(settings, group)
    distributed.close(group)


def rollback(version: int) -> None:
    """Republish an earlier `version` on model-updates.v1 (`rollback: true`), after checking
    that the store can still rebuild it bit-exactly."""
    settings = TrainerSettings()
    logs.setup(settings.log_level)
    bootstrap = resolve_bootstrap(settings)

    from confluent_kafka import Producer

    from schemas.codec import encode, key_of
    from schemas.topics import MODEL_UPDATES
    from services.checkpoints.store import CheckpointStore
    from services.trainer.loop import rollback_event

    assert settings.checkpoint_dir is not None
    ev = rollback_event(CheckpointStore(settings.checkpoint_dir), settings.model_name, version)
    producer = Producer(producer_config(bootstrap, settings))
    topic = MODEL_UPDATES.full_name(settings.topic_prefix)
    producer.produce(topic, encode(ev), key=key_of(ev, MODEL_UPDATES.key))
    if producer.flush(30) != 0:
        raise SystemExit(f"could not deliver the rollback event to {topic}")
    logs.event(log, "rolled_back", model=settings.model_name, version=version, event_id=ev.event_id)


if __name__ == "__main__":
    main()
