"""`rlfeed rewardmodel serve`: score (prompt, completion) pairs over HTTP with the latest
published reward model.

`POST /v1/score` `{"items": [{"prompt": ..., "completion": ...}]}` answers
`{"model", "version", "scores"}` (503 while no version is loaded); `GET /healthz`.
The version follows model-updates.v1: a thread reads the compacted topic from the
beginning (no group offsets, like a serving replica) and loads each new version of
`reward_model_name` from the checkpoint store; a version that fails to load is logged
and the previous one keeps serving.
"""

from __future__ import annotations

import logging
import threading
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from pydantic import BaseModel, Field

from schemas.codec import InvalidEvent, decode
from schemas.events import ModelUpdateEvent
from schemas.topics import MODEL_UPDATES
from services.kafka.idle import EndPauses
from services.kafka.security import librdkafka_config
from services.logs import event
from services.preferences.scoring import ScoreFn, load_published
from services.rewardmodel.settings import RewardModelSettings

log = logging.getLogger(__name__)


class Item(BaseModel):
    prompt: str = Field(max_length=200_000)
    completion: str = Field(max_length=200_000)


class ScoreRequest(BaseModel):
    items: list[Item]


class Current:
    """The loaded version and its scoring function, swapped atomically."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.fn: ScoreFn | None = None
        self.lock = threading.Lock()

    def load(self, s: RewardModelSettings, version: int | None) -> None:
        """Load `version` (None: the latest in the store); keep the old one on failure."""
        try:
            loaded, fn = load_published(s.store_dir, s.reward_model_name, version, torch_threads=s.rm_torch_threads)
        except Exception as exc:
            event(log, "rewardmodel.load_failed", level=logging.WARNING, version=version, error=repr(exc)[:300])
            return
        with self.lock:
            self.version, self.fn = loaded, fn
        event(log, "rewardmodel.loaded", version=loaded)


def follow(s: RewardModelSettings, bootstrap: str, current: Current, stop: threading.Event) -> None:
    """Load every new version of the reward model announced on model-updates.v1."""
    consumer = Consumer(
        {
            **librdkafka_config(bootstrap, s),
            "group.id": f"rlfeed-rm-serve-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,  # for EndPauses
        }
    )
    consumer.assign([TopicPartition(MODEL_UPDATES.full_name(s.topic_prefix), 0, OFFSET_BEGINNING)])
    pauses = EndPauses(consumer, s.kafka_idle_pause_ms)
    try:
        while not stop.is_set():
            for m in pauses.consume(100, 1.0):
                if m.error() is not None:
                    continue
                try:
                    update = decode(ModelUpdateEvent, m.value())
                except InvalidEvent:
                    continue
                if update.model == s.reward_model_name and update.version != current.version:
                    current.load(s, update.version)
    finally:
        consumer.close()


def create_app(s: RewardModelSettings, current: Current) -> Any:
    """The FastAPI app of the scoring server."""
    from fastapi import FastAPI, HTTPException

    app = FastAPI(title="rlfeed reward model")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"model": s.reward_model_name, "version": current.version, "ready": current.fn is not None}

    @app.post("/v1/score")
    def score(req: ScoreRequest) -> dict[str, Any]:
        if len(req.items) > s.rm_serve_max_items:
            raise HTTPException(413, f"at most {s.rm_serve_max_items} items per request")
        with current.lock:
            version, fn = current.version, current.fn
        if fn is None:
            raise HTTPException(503, f"no version of {s.reward_model_name} is loaded yet")
        scores = fn([x.prompt for x in req.items], [x.completion for x in req.items])
        return {"model": s.reward_model_name, "version": version, "scores": scores}

    return app
