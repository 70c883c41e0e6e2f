"""The events that flow through rlfeed's topics: the public contract.

Every event is one JSON object (UTF-8) per Kafka message, keyed as in `schemas.topics`.
Fields are strict: unknown fields, wrong types and out-of-range values are rejected with
an error that names the field (see `schemas.codec`). Times are integer milliseconds since
the Unix epoch (`*_ms`); durations carry their unit in the name.

A change that would break an existing consumer gets a new `.vN` topic and a new
`schema_version`; adding an optional field does not.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Contract limits: anything beyond them is "absurd" input and is dead-lettered.
MAX_TEXT_CHARS = 200_000
MAX_TOKENS = 32_768
MAX_ID_CHARS = 128
MAX_COMPONENTS = 64
MAX_SAFE_INT = 2**53 - 1
"""Upper bound of every unbounded integer: exact in JSON doubles, and always encodable by
orjson (a hostile 2**64 would otherwise crash whoever re-emits the event)."""

Id = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=r"^[A-Za-z0-9._:@/+=-]+$")]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
MAX_TIME_MS = 4_102_444_800_000
"""2100-01-01T00:00:00Z, the latest event time accepted. ClickHouse's TTLs compute in
DateTime (32-bit seconds, which wraps after 2106-02-07): a later time would read as the
1970s there and its row be deleted at the next merge, silently; refused, it goes to the
dead-letter topic with the field named."""
TimeMs = Annotated[int, Field(ge=0, le=MAX_TIME_MS, description="Milliseconds since the Unix epoch.")]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=2**31)]], Field(max_length=MAX_TOKENS)]
Logprobs = Annotated[list[Annotated[float, Field(le=0.0, ge=-1e4, allow_inf_nan=False)]], Field(max_length=MAX_TOKENS)]
Metrics = Annotated[
    dict[Annotated[str, Field(max_length=MAX_ID_CHARS)], Annotated[float, Field(allow_inf_nan=False)]],
    Field(max_length=MAX_COMPONENTS),
]
"""Named figures (reward components, eval metrics, arm statistics)."""


def now_ms() -> int:
    """The current wall-clock time in epoch milliseconds."""
    return time.time_ns() // 1_000_000


def new_event_id() -> str:
    """A fresh random event id (32 hex characters)."""
    return uuid.uuid4().hex


class Event(BaseModel):
    """Fields every event carries."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=True)

    schema_version: Literal[1] = 1
    """Version of this event's schema; a breaking change gets a new topic."""
    event_id: Id = Field(default_factory=new_event_id)
    """Unique id of this event; consumers deduplicate on it."""
    event_time_ms: TimeMs = Field(default_factory=now_ms)
    """When the event happened at its source (epoch ms)."""
    tenant_id: Id = "default"
    """The product or customer the event belongs to."""


class SamplingParams(BaseModel):
    """The sampler settings a generation was produced with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: Annotated[float, Field(ge=0.0, le=10.0, allow_inf_nan=False)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    max_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = 256
    seed: Annotated[int, Field(ge=-MAX_SAFE_INT, le=MAX_SAFE_INT)] | None = None


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"


class GenerationEvent(Event):
    """One completion a serving replica (or an app that serves itself) showed a user.

    Carries everything the trainer needs: token ids of prompt and completion, the
    sampler's logprob for each completion token, and the policy version that sampled it.
    """

    generation_id: Id
    """Id the app attaches feedback to; the Kafka key."""
    model: Id
    """Name of the policy model (the key of model-updates.v1)."""
    policy_version: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
    """Version of the weights that produced the completion."""
    prompt: Text
    """The prompt as text (after the chat template)."""
    completion: Text
    """The completion as text."""
    prompt_token_ids: TokenIds
    completion_token_ids: TokenIds
    completion_logprobs: Logprobs
    """Sampler logprob of each completion token; same length as completion_token_ids."""
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    finish_reason: FinishReason = FinishReason.STOP
    user_id: Id
    """Pseudonymous user id (never an email or a name)."""
    session_id: Id | None = None
    replica_id: Id | None = None
    """Which replica served it, if a replica did."""
    latency_ms: Annotated[float, Field(ge=0.0, le=1e8, allow_inf_nan=False)] | None = None
    """Wall time from request to last token."""

    @model_validator(mode="after")
    def _logprobs_match_tokens(self) -> GenerationEvent:
        if len(self.completion_logprobs) != len(self.completion_token_ids):
            raise ValueError(
                f"completion_logprobs: has {len(self.completion_logprobs)} entries, "
                f"completion_token_ids has {len(self.completion_token_ids)}; they must match"
            )
        return self


class FeedbackKind(StrEnum):
    """What the user did. `value` means something different for each kind."""

    THUMB = "thumb"  # value: +1 (up) or -1 (down)
    RATING = "rating"  # value: 1..5
    ACCEPT = "accept"  # terminal; no value
    REJECT = "reject"  # terminal; no value
    EDIT = "edit"  # edited_text required; terminal when final=true
    COPY = "copy"  # no value
    REGENERATE = "regenerate"  # no value
    DWELL = "dwell"  # value: seconds spent reading, >= 0


TERMINAL_KINDS = frozenset({FeedbackKind.ACCEPT, FeedbackKind.REJECT})


class FeedbackEvent(Event):
    """A signal a user gave about one generation. May arrive before the generation,
    several times, late, or never."""

    generation_id: Id
    """The generation this feedback is about; the Kafka key."""
    kind: FeedbackKind
    value: Annotated[float, Field(allow_inf_nan=False)] | None = None
    """thumb: +1/-1; rating: 1..5; dwell: seconds (>= 0); absent for the other kinds."""
    edited_text: Text | None = None
    """For kind=edit: the text the user ended up with."""
    final: bool = False
    """For kind=edit: the user is done editing (a terminal signal)."""
    user_id: Id
    session_id: Id | None = None

    @model_validator(mode="after")
    def _value_fits_kind(self) -> FeedbackEvent:
        kind, value = self.kind, self.value
        if kind == FeedbackKind.THUMB and value not in (1.0, -1.0):
            raise ValueError("value: a thumb must be +1 or -1")
        if kind == FeedbackKind.RATING and (value is None or not 1.0 <= value <= 5.0):
            raise ValueError("value: a rating must be between 1 and 5")
        if kind == FeedbackKind.DWELL and (value is None or not 0.0 <= value <= 86_400.0):
            raise ValueError("value: dwell must be seconds between 0 and 86400")
        if kind in (FeedbackKind.ACCEPT, FeedbackKind.REJECT, FeedbackKind.COPY, FeedbackKind.REGENERATE) and (
            value is not None
        ):
            raise ValueError(f"value: kind {kind} takes no value")
        if kind == FeedbackKind.EDIT and self.edited_text is None:
            raise ValueError("edited_text: required for kind=edit")
        if kind != FeedbackKind.EDIT and (self.edited_text is not None or self.final):
            raise ValueError("edited_text: only kind=edit takes edited_text or final")
        return self

    @property
    def is_terminal(self) -> bool:
        """Whether this signal settles the reward at once (accept, reject, final edit)."""
        return self.kind in TERMINAL_KINDS or (self.kind == FeedbackKind.EDIT and self.final)


class SettleReason(StrEnum):
    TERMINAL = "terminal"  # accept, reject or a final edit arrived
    WINDOW = "window"  # the settle window after the first feedback passed
    TTL = "ttl"  # no feedback before the generation's TTL; implicit reward applied
    CORRECTION = "correction"  # feedback arrived after the sample was settled


class SampleEvent(Event):
    """A reward-labelled generation, ready for the trainer.

    `event_id` is deterministic (derived from the generation id, the feedback event ids
    and the settle reason), so a replay after a crash produces the same id and
    downstream consumers drop duplicates by it.
    """

    generation_id: Id
    model: Id
    policy_version: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
    prompt: Text
    completion: Text
    prompt_token_ids: TokenIds
    completion_token_ids: TokenIds
    completion_logprobs: Logprobs
    reward: Annotated[float, Field(ge=-1e3, le=1e3, allow_inf_nan=False)]
    """The composite reward the trainer optimises."""
    reward_components: Metrics
    """Each reward function's contribution, kept for audit."""
    feedback_event_ids: Annotated[list[Id], Field(max_length=4096)]
    settle_reason: SettleReason
    corrects_event_id: Id | None = None
    """For settle_reason=correction: the sample this one supersedes."""
    user_id: Id
    generated_at_ms: TimeMs
    """event_time_ms of the generation."""
    first_feedback_ms: TimeMs | None = None
    """event_time_ms of the earliest feedback joined into it (None: settled without any);
    the start of the loop's feedback-to-training latency."""


class ArtifactKind(StrEnum):
    FULL = "full"  # a complete safetensors snapshot
    DELTA = "delta"  # only the changed elements against base_version, compressed


class ModelUpdateEvent(Event):
    """A new policy version that replicas should load. Compacted by model name."""

    model: Id
    version: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
    parent_version: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)] | None = None
    artifact_kind: ArtifactKind
    artifact_url: Annotated[str, Field(min_length=1, max_length=2048)]
    """Where the artifact lies inside the checkpoint store (a relative path or an URL)."""
    base_version: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)] | None = None
    """For a delta: the version it applies to."""
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """Checksum of the artifact bytes."""
    weights_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None = None
    """Checksum of the reconstructed weights, so replicas verify bit-exactness."""
    size_bytes: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
    eval_metrics: Metrics = Field(default_factory=dict)
    """The eval gate's figures for this version."""
    rollback: bool = False
    """True when an operator republished an earlier version."""

    @model_validator(mode="after")
    def _delta_has_base(self) -> ModelUpdateEvent:
        if self.artifact_kind == ArtifactKind.DELTA and self.base_version is None:
            raise ValueError("base_version: required for a delta artifact")
        return self


class ReplicaState(StrEnum):
    STARTING = "starting"
    SERVING = "serving"
    LOADING = "loading"
    ERROR = "error"
    STOPPED = "stopped"


class VersionTraffic(BaseModel):
    """What one replica ran on one policy version since it started (cumulative counters)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
    requests: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)] = 0
    """Requests the engine ran on this version."""
    failures: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)] = 0
    """Of those, the ones that failed in the engine (the client got an error)."""
    latency_ms_buckets: Annotated[
        dict[Annotated[str, Field(max_length=32)], Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]], Field(max_length=128)
    ] = Field(default_factory=dict)
    """Answered requests by latency (request to last token), keyed by the bucket's upper
    bound in ms (`inf` for the last); buckets with no request are left out
    (services/rollout/latency.py)."""


class ReplicaStatusEvent(Event):
    """What a serving replica is doing and which version it serves."""

    replica_id: Id
    model: Id
    version: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
    state: ReplicaState
    engine: Literal["transformers", "vllm"]
    url: Annotated[str, Field(max_length=2048)] | None = None
    error: Text | None = None
    requests_total: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)] = 0
    started_ms: TimeMs | None = None
    """When this replica process started: its counters (`traffic`) count from then."""
    traffic: Annotated[list[VersionTraffic], Field(max_length=16)] = Field(default_factory=list)
    """Per recent policy version: requests, failures and latencies since `started_ms`
    (cumulative; the canary rollout's error-rate and latency guardrails read them)."""
    events_dropped: Annotated[
        dict[Annotated[str, Field(max_length=32)], Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]], Field(max_length=16)
    ] = Field(default_factory=dict)
    """Events this replica lost since `started_ms` (generations, its own status), by reason:
    `buffer_full`, `delivery_failed`, `no_broker`, `invalid_event`, `error`, ... (cumulative;
    the dashboard's `replica_dropping_events` alert reads the increase)."""


class DeadLetterEvent(Event):
    """Input someone rejected, with the reason and the original bytes (base64)."""

    source_topic: Annotated[str, Field(min_length=1, max_length=256)]
    source_partition: Annotated[int, Field(ge=-1, le=MAX_SAFE_INT)] = -1
    source_offset: Annotated[int, Field(ge=-1, le=MAX_SAFE_INT)] = -1
    """-1 when the input did not come from Kafka (e.g. the gateway)."""
    key_b64: str | None = None
    """The original message key, base64."""
    original_b64: str
    """The original message value, base64, byte for byte."""
    error_field: Annotated[str, Field(max_length=512)] | None = None
    """The field the error is about, dotted (`completion_logprobs.3`), if any."""
    reason: Annotated[str, Field(max_length=4096)]
    rejected_by: Annotated[str, Field(max_length=256)]
    """The component that rejected it (e.g. `streams`, `sink`, `gateway`)."""


class RolloutDecision(StrEnum):
    COLLECT = "collect"
    PROMOTE = "promote"
    ROLLBACK = "rollback"


class RolloutEvent(Event):
    """The traffic split for a model: which version is stable, which is the candidate."""

    model: Id
    stable_version: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)]
    candidate_version: Annotated[int, Field(ge=0, le=MAX_SAFE_INT)] | None = None
    candidate_traffic: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.0
    """Share of new users sent to the candidate."""
    decision: RolloutDecision
    reason: Annotated[str, Field(max_length=4096)] = ""
    arms: Metrics = Field(default_factory=dict)
    """Per-arm counts and statistics behind the decision."""


class PreferenceKind(StrEnum):
    """Which user signal a preference was mined from (services/preferences/mining.py)."""

    EDIT = "edit"  # the user's edited text over the completion
    REGENERATE_ACCEPT = "regenerate_accept"  # an accepted completion over an earlier regenerated one
    ACCEPT_REJECT = "accept_reject"  # an accepted completion over a rejected one
    RATING = "rating"  # the higher-rated completion over the lower-rated one
    THUMB = "thumb"  # a thumbed-up completion over a thumbed-down one
    UNPAIRED = "unpaired"  # one completion with a thumb, for a KTO-style objective


class PreferenceEvent(Event):
    """A user preference between two completions of one prompt (`chosen` over `rejected`),
    or, for kind=unpaired, one completion alone: liked when only `chosen` is set, disliked
    when only `rejected` is. Mined by the streams worker when generations settle;
    `event_id` is deterministic, so replays produce the same id."""

    generation_id: Id
    """The generation whose settling mined this preference; the Kafka key."""
    kind: PreferenceKind
    model: Id
    """The policy that produced the completions."""
    prompt: Text
    chosen: Text | None = None
    """The preferred text (a completion, or the user's edit)."""
    rejected: Text | None = None
    """The text the user preferred less."""
    chosen_generation_id: Id | None = None
    """The generation of `chosen`; None for an edit (no generation produced it)."""
    rejected_generation_id: Id | None = None
    margin: Annotated[float, Field(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0
    """Strength of the preference in (0, 1] (a rating difference / 4; 1 otherwise)."""
    feedback_event_ids: Annotated[list[Id], Field(max_length=4096)] = Field(default_factory=list)
    """The feedback events it was mined from."""
    user_id: Id

    @model_validator(mode="after")
    def _texts_fit_kind(self) -> PreferenceEvent:
        if self.kind == PreferenceKind.UNPAIRED:
            if (self.chosen is None) == (self.rejected is None):
                raise ValueError("chosen: an unpaired preference sets exactly one of chosen and rejected")
        elif self.chosen is None or self.rejected is None:
            raise ValueError(f"chosen: a {self.kind} preference needs both chosen and rejected")
        return self


def forget_event_id(tenant_id: str, user_id: str) -> str:
    """The deterministic event id (and Kafka key) of a forget request: one per (tenant, user)."""
    return hashlib.sha256(f"{tenant_id}\x1f{user_id}".encode()).hexdigest()[:32]


class ForgetEvent(Event):
    """An operator's request that a user's data be deleted and never trained on again
    (`rlfeed forget USER_ID`). Compacted by `event_id`, which is derived from tenant and
    user, so the topic keeps one record per forgotten user; the stream worker drops the
    samples of every (tenant_id, user_id) on it."""

    user_id: Id
    """The pseudonymous user id to forget, within `tenant_id`."""
    requested_by: Annotated[str, Field(max_length=256)] = ""
    """Who asked (an operator name or a ticket reference); free text, for the audit trail."""

    @model_validator(mode="after")
    def _id_is_derived(self) -> ForgetEvent:
        expected = forget_event_id(self.tenant_id, self.user_id)
        if self.event_id != expected:
            raise ValueError(f"event_id: must be forget_event_id(tenant_id, user_id) = {expected}")
        return self

    @classmethod
    def for_user(cls, tenant_id: str, user_id: str, **fields: object) -> ForgetEvent:
        """The forget request of one user (its event id derived)."""
        return cls(event_id=forget_event_id(tenant_id, user_id), tenant_id=tenant_id, user_id=user_id, **fields)
