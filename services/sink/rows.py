"""Pure mapping from events to ClickHouse rows, one table per topic.

Each table has one *tuple* function (the sink's hot path: a tuple in `TableSpec.columns`
order, times as integer epoch milliseconds, which DateTime64(3) takes as raw ticks);
`TableSpec.as_dict` derives named fields from it for other callers (times there are
timezone-aware datetimes). The tuple functions are the single source of truth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import orjson

from schemas.events import (
    DeadLetterEvent,
    Event,
    FeedbackEvent,
    ForgetEvent,
    GenerationEvent,
    ModelUpdateEvent,
    PreferenceEvent,
    ReplicaStatusEvent,
    RolloutEvent,
    SampleEvent,
)
from services.privacy.redact import redact_specs

BASE_COLUMNS = ("event_id", "event_time", "tenant_id")


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def generation_tuple(e: GenerationEvent) -> tuple:
    """A generations row (see `GENERATIONS_COLUMNS`)."""
    s = e.sampling
    return (
        e.event_id,
        e.event_time_ms,
        e.tenant_id,
        e.generation_id,
        e.model,
        e.policy_version,
        e.prompt,
        e.completion,
        len(e.prompt_token_ids),
        len(e.completion_token_ids),
        float(sum(e.completion_logprobs)),
        s.temperature,
        s.top_p,
        s.max_tokens,
        str(e.finish_reason),
        e.user_id,
        e.session_id,
        e.replica_id,
        e.latency_ms,
    )


def feedback_tuple(e: FeedbackEvent) -> tuple:
    """A feedback row."""
    return (
        e.event_id,
        e.event_time_ms,
        e.tenant_id,
        e.generation_id,
        str(e.kind),
        e.value,
        e.edited_text,
        1 if e.final else 0,
        e.user_id,
        e.session_id,
    )


def sample_tuple(e: SampleEvent) -> tuple:
    """A samples row."""
    return (
        e.event_id,
        e.event_time_ms,
        e.tenant_id,
        e.generation_id,
        e.model,
        e.policy_version,
        e.reward,
        dict(e.reward_components),
        str(e.settle_reason),
        e.corrects_event_id,
        len(e.feedback_event_ids),
        len(e.completion_token_ids),
        len(e.completion),
        e.user_id,
        e.generated_at_ms,
    )


def model_update_tuple(e: ModelUpdateEvent) -> tuple:
    """A model_updates row."""
    return (
        e.event_id,
        e.event_time_ms,
        e.tenant_id,
        e.model,
        e.version,
        e.parent_version,
        str(e.artifact_kind),
        e.artifact_url,
        e.base_version,
        e.sha256,
        e.size_bytes,
        dict(e.eval_metrics),
        1 if e.rollback else 0,
    )


def replica_status_tuple(e: ReplicaStatusEvent) -> tuple:
    """A replica_status row."""
    return (
        e.event_id,
        e.event_time_ms,
        e.tenant_id,
        e.replica_id,
        e.model,
        e.version,
        str(e.state),
        e.engine,
        e.url,
        e.error,
        e.requests_total,
        dict(e.events_dropped),
    )


def dead_letter_tuple(e: DeadLetterEvent) -> tuple:
    """A dead_letters row."""
    return (
        e.event_id,
        e.event_time_ms,
        e.tenant_id,
        e.source_topic,
        e.source_partition,
        e.source_offset,
        e.key_b64,
        e.original_b64,
        e.error_field,
        e.reason,
        e.rejected_by,
    )


def rollout_tuple(e: RolloutEvent) -> tuple:
    """A rollouts row."""
    return (
        e.event_id,
        e.event_time_ms,
        e.tenant_id,
        e.model,
        e.stable_version,
        e.candidate_version,
        e.candidate_traffic,
        str(e.decision),
        e.reason,
        dict(e.arms),
    )


def preference_tuple(e: PreferenceEvent) -> tuple:
    """A preferences row."""
    return (
        e.event_id,
        e.event_time_ms,
        e.tenant_id,
        e.generation_id,
        str(e.kind),
        e.model,
        e.prompt,
        e.chosen,
        e.rejected,
        e.chosen_generation_id,
        e.rejected_generation_id,
        e.margin,
        len(e.feedback_event_ids),
        e.user_id,
    )


def forget_tuple(e: ForgetEvent) -> tuple:
    """A forget_requests row."""
    return (e.event_id, e.event_time_ms, e.tenant_id, e.user_id, e.requested_by)


@dataclass(frozen=True)
class TableSpec:
    """One topic's table: its name, column order, tuple function and time columns."""

    table: str
    columns: tuple[str, ...]
    row: Callable[[Any], tuple]
    """Event -> tuple in `columns` order (times as epoch ms)."""
    time_columns: tuple[str, ...] = ("event_time",)
    """Columns holding epoch ms (DateTime64(3)); the dict functions turn them into datetimes."""

    @cached_property
    def time_indexes(self) -> tuple[int, ...]:
        """Positions of `time_columns` in `columns`."""
        return tuple(self.columns.index(c) for c in self.time_columns)

    def as_dict(self, e: Event) -> dict:
        """The row as a dict of column -> value, times as UTC datetimes."""
        row = dict(zip(self.columns, self.row(e), strict=True))
        for col in self.time_columns:
            row[col] = _ts(row[col])
        return row


INSERT_FORMAT = "JSONCompactColumns"
"""The format of `json_columns`' bytes, which ClickHouse parses itself (in C++, without the GIL)."""


def json_columns(spec: TableSpec, rows: list[tuple]) -> bytes:
    """Rows of `spec`'s table as one `JSONCompactColumns` document: a JSON array of
    columns in `spec.columns` order, for `client.raw_insert(..., fmt=INSERT_FORMAT)`.

    The sink's insert: orjson writes the whole batch in one C call, and ClickHouse parses
    it in C++ (chdb releases the GIL meanwhile), instead of clickhouse-connect
    serialising each column in Python. Times go as epoch *seconds* with three decimals
    (ClickHouse reads a JSON number into DateTime64(3) as seconds): `ms / 1000` is the
    double nearest to that decimal, whose shortest repr (what orjson writes) is the
    decimal itself for every ms below 10**15 (<= 15 significant digits), so the tick
    lands exactly. Nulls are JSON null, maps JSON objects, floats their shortest repr
    (the contract has no inf/NaN), strings escaped by orjson (any unicode, control
    characters and NUL included)."""
    columns: list[Any] = list(zip(*rows, strict=True)) if rows else [() for _ in spec.columns]
    for i in spec.time_indexes:
        columns[i] = [ms / 1000 for ms in columns[i]]
    return orjson.dumps(columns)


SPECS: dict[str, TableSpec] = {
    "generations.v1": TableSpec(
        "generations",
        (
            *BASE_COLUMNS,
            "generation_id",
            "model",
            "policy_version",
            "prompt",
            "completion",
            "prompt_tokens",
            "completion_tokens",
            "completion_logprob_sum",
            "temperature",
            "top_p",
            "max_tokens",
            "finish_reason",
            "user_id",
            "session_id",
            "replica_id",
            "latency_ms",
        ),
        generation_tuple,
    ),
    "feedback.v1": TableSpec(
        "feedback",
        (*BASE_COLUMNS, "generation_id", "kind", "value", "edited_text", "final", "user_id", "session_id"),
        feedback_tuple,
    ),
    "samples.v1": TableSpec(
        "samples",
        (
            *BASE_COLUMNS,
            "generation_id",
            "model",
            "policy_version",
            "reward",
            "reward_components",
            "settle_reason",
            "corrects_event_id",
            "feedback_count",
            "completion_tokens",
            "completion_chars",
            "user_id",
            "generated_at",
        ),
        sample_tuple,
        ("event_time", "generated_at"),
    ),
    "model-updates.v1": TableSpec(
        "model_updates",
        (
            *BASE_COLUMNS,
            "model",
            "version",
            "parent_version",
            "artifact_kind",
            "artifact_url",
            "base_version",
            "sha256",
            "size_bytes",
            "eval_metrics",
            "rollback",
        ),
        model_update_tuple,
    ),
    "replica-status.v1": TableSpec(
        "replica_status",
        (
            *BASE_COLUMNS,
            "replica_id",
            "model",
            "version",
            "state",
            "engine",
            "url",
            "error",
            "requests_total",
            "events_dropped",
        ),
        replica_status_tuple,
    ),
    "dlq.v1": TableSpec(
        "dead_letters",
        (
            *BASE_COLUMNS,
            "source_topic",
            "source_partition",
            "source_offset",
            "key_b64",
            "original_b64",
            "error_field",
            "reason",
            "rejected_by",
        ),
        dead_letter_tuple,
    ),
    "rollouts.v1": TableSpec(
        "rollouts",
        (
            *BASE_COLUMNS,
            "model",
            "stable_version",
            "candidate_version",
            "candidate_traffic",
            "decision",
            "reason",
            "arms",
        ),
        rollout_tuple,
    ),
    "preferences.v1": TableSpec(
        "preferences",
        (
            *BASE_COLUMNS,
            "generation_id",
            "kind",
            "model",
            "prompt",
            "chosen",
            "rejected",
            "chosen_generation_id",
            "rejected_generation_id",
            "margin",
            "feedback_count",
            "user_id",
        ),
        preference_tuple,
    ),
    "forget-requests.v1": TableSpec("forget_requests", (*BASE_COLUMNS, "user_id", "requested_by"), forget_tuple),
}
"""Topic name (unprefixed) -> its table spec."""

# Privacy: every free-text column (prompts, completions, edits, dead letters' original
# bytes) is redacted (RLFEED_REDACT_*) before it can reach ClickHouse.
SPECS = redact_specs(SPECS)
