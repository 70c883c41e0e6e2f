"""Valid example events for tests (small, deterministic, overridable)."""

from __future__ import annotations

from schemas.events import FeedbackEvent, GenerationEvent


def generation(generation_id: str = "gen-1", **overrides: object) -> GenerationEvent:
    fields = {
        "generation_id": generation_id,
        "model": "smollm2-135m-instruct",
        "policy_version": 0,
        "prompt": "Suggest a name for a cat.",
        "completion": "Whiskers.",
        "prompt_token_ids": [1, 2, 3],
        "completion_token_ids": [4, 5],
        "completion_logprobs": [-0.5, -1.25],
        "user_id": "user-1",
    }
    return GenerationEvent(**(fields | overrides))


def feedback(generation_id: str = "gen-1", kind: str = "thumb", value: float | None = 1.0, **overrides: object):
    fields = {"generation_id": generation_id, "kind": kind, "value": value, "user_id": "user-1"}
    return FeedbackEvent(**(fields | overrides))
