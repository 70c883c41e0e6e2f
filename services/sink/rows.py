"""Pure mapping from events to ClickHouse rows, one table per topic."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from schemas.events import (
    DeadLetterEvent,
    Event,
    FeedbackEvent,
    GenerationEvent,
    ModelUpdateEvent,
    ReplicaStatusEvent,
    RolloutEvent,
    SampleEvent,
)


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _base(e: Event) -> dict:
    return {"event_id": e.event_id, "event_time": _ts(e.event_time_ms), "tenant_id": e.tenant_id}


def generation_row(e: GenerationEvent) -> dict:
    return _base(e) | {
        "generation_id": e.generation_id,
        "model": e.model,
        "policy_version": e.policy_version,
        "prompt": e.prompt,
        "completion": e.completion,
        "prompt_tokens": len(e.prompt_token_ids),
        "completion_tokens": len(e.completion_token_ids),
        "completion_logprob_sum": float(sum(e.completion_logprobs)),
        "temperature": e.sampling.temperature,
        "top_p": e.sampling.top_p,
        "max_tokens": e.sampling.max_tokens,
        "finish_reason": str(e.finish_reason),
        "user_id": e.user_id,
        "session_id": e.session_id,
        "replica_id": e.replica_id,
        "latency_ms": e.latency_ms,
    }


def feedback_row(e: FeedbackEvent) -> dict:
    return _base(e) | {
        "generation_id": e.generation_id,
        "kind": str(e.kind),
        "value": e.value,
        "edited_text": e.edited_text,
        "final": int(e.final),
        "user_id": e.user_id,
        "session_id": e.session_id,
    }


def sample_row(e: SampleEvent) -> dict:
    return _base(e) | {
        "generation_id": e.generation_id,
        "model": e.model,
        "policy_version": e.policy_version,
        "reward": e.reward,
        "reward_components": dict(e.reward_components),
        "settle_reason": str(e.settle_reason),
        "corrects_event_id": e.corrects_event_id,
        "feedback_count": len(e.feedback_event_ids),
        "completion_tokens": len(e.completion_token_ids),
        "completion_chars": len(e.completion),
        "user_id": e.user_id,
        "generated_at": _ts(e.generated_at_ms),
    }


def model_update_row(e: ModelUpdateEvent) -> dict:
    return _base(e) | {
        "model": e.model,
        "version": e.version,
        "parent_version": e.parent_version,
        "artifact_kind": str(e.artifact_kind),
        "artifact_url": e.artifact_url,
        "base_version": e.base_version,
        "sha256": e.sha256,
        "size_bytes": e.size_bytes,
        "eval_metrics": dict(e.eval_metrics),
        "rollback": int(e.rollback),
    }


def replica_status_row(e: ReplicaStatusEvent) -> dict:
    return _base(e) | {
        "replica_id": e.replica_id,
        "model": e.model,
        "version": e.version,
        "state": str(e.state),
        "engine": e.engine,
        "url": e.url,
        "error": e.error,
        "requests_total": e.requests_total,
    }


def dead_letter_row(e: DeadLetterEvent) -> dict:
    return _base(e) | {
        "source_topic": e.source_topic,
        "source_partition": e.source_partition,
        "source_offset": e.source_offset,
        "key_b64": e.key_b64,
        "original_b64": e.original_b64,
        "error_field": e.error_field,
        "reason": e.reason,
        "rejected_by": e.rejected_by,
    }


def rollout_row(e: RolloutEvent) -> dict:
    return _base(e) | {
        "model": e.model,
        "stable_version": e.stable_version,
        "candidate_version": e.candidate_version,
        "candidate_traffic": e.candidate_traffic,
        "decision": str(e.decision),
        "reason": e.reason,
        "arms": dict(e.arms),
    }


TABLES: dict[str, tuple[str, Callable]] = {
    "generations.v1": ("generations", generation_row),
    "feedback.v1": ("feedback", feedback_row),
    "samples.v1": ("samples", sample_row),
    "model-updates.v1": ("model_updates", model_update_row),
    "replica-status.v1": ("replica_status", replica_status_row),
    "dlq.v1": ("dead_letters", dead_letter_row),
    "rollouts.v1": ("rollouts", rollout_row),
}
"""Topic name (unprefixed) -> (table, row function)."""
