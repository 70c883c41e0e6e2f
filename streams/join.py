"""The generation ⋈ feedback join as pure state transitions over a batch of records.

No Kafka in here: `process_batch` takes the decoded-or-not records of one fetched batch
and the per-partition states, mutates the states, and returns what to write (samples,
changelog records, dead letters). The hot path and the benchmark both drive it; the unit
tests feed it by hand.

Semantics (all times are event time unless said otherwise):

- Each partition has an event clock: the largest `event_time_ms` seen in it, moved on by
  the wall clock while the partition is idle (`clock = max_event + wall elapsed since`).
- A generation waits for feedback. Feedback may come first: it is buffered under the
  generation id (an "orphan") until the generation arrives.
- Feedback is deduplicated by event id; a generation seen again with the same event id is
  a duplicate, with another event id it is dead-lettered.
- A reward settles on a terminal signal (accept, reject, final edit; at the terminal
  feedback's event time) or `settle_window_s` after the first feedback's event time.
- A generation without feedback `generation_ttl_s` after it was generated expires: it is
  settled with reason `ttl` and `ttl_implicit_reward` when that is set, or with the
  reward model's score alone when `model_scores` has one, else dropped (no sample).
  Either way it is remembered like a settled key.
- With `model_scores` set, pending generations are handed out for scoring
  (`BatchOutput.to_score`) and a sample gets the `reward_model` component when its score
  is ready at settle time (missing: counted as `reward_model_skipped`, never waited for).
- A settled key is remembered `correction_window_s` (by settle time) for late feedback:
  new feedback on a key that produced a sample emits a correction sample
  (`settle_reason=correction`, `corrects_event_id` = the sample it supersedes, reward over
  all the feedback); new feedback on a dropped or capped key reopens it as pending.
- Orphan feedback whose generation does not arrive within `orphan_feedback_ttl_s` (this
  includes feedback later than the correction window) is dead-lettered with the reason.
  Nothing is dropped silently: every input ends in a sample, a dead letter, or a counter
  of duplicates, expired or capped keys.
- Bounds per partition: `max_pending_generations` (the oldest pending key settles or
  expires early), `max_settled_keys` (the oldest is forgotten),
  `max_feedback_per_generation` (more feedback is dead-lettered).
- Each user may contribute ceil(`user_cap_samples_per_window` / partitions) samples per
  partition per tumbling `user_cap_window_s`; beyond it a settled key emits no sample
  (counted as `capped`, reopened by later feedback). Corrections do not count.
- Sample ids are deterministic: sha256 of generation id, settle reason and the sorted
  feedback event ids, so a replay after a crash produces the same ids.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from schemas.codec import MAX_MESSAGE_BYTES, InvalidEvent, dead_letter, encode
from schemas.events import FeedbackKind, SettleReason
from schemas.fast import (
    FAST_ERRORS,
    FEEDBACK_DECODER,
    GENERATION_SPLICE_DECODER,
    Feedback,
    Generation,
    JsonArray,
    decode_feedback,
    decode_generation,
)
from services.preferences.mining import Outcome
from streams.rewards import RewardInput, RewardParams, components, composite

GEN = 0
"""Record source: generations.v1."""
FB = 1
"""Record source: feedback.v1."""

REJECTED_BY = "streams"

EXPLICIT_KINDS = frozenset({FeedbackKind.THUMB, FeedbackKind.RATING, FeedbackKind.EDIT})
_TERMINAL, _WINDOW, _TTL, _CORRECTION = (
    SettleReason.TERMINAL.value,
    SettleReason.WINDOW.value,
    SettleReason.TTL.value,
    SettleReason.CORRECTION.value,
)
"""Settle reasons as plain strings: an enum member costs a lookup per use on the hot path."""
"""Feedback that states a verdict; without it a generation has only implicit feedback."""


class ScoreLookup(Protocol):
    """Reward-model scores by generation id, filled off the hot path (never waits)."""

    def get(self, gid: str, default: float | None = None, /) -> float | None: ...


@dataclass(frozen=True)
class JoinConfig:
    """The join's windows and bounds in milliseconds, and the reward configuration."""

    settle_window_ms: int = 30_000
    generation_ttl_ms: int = 600_000
    orphan_feedback_ttl_ms: int = 600_000
    correction_window_ms: int = 3_600_000
    max_clock_skew_ms: int = 300_000
    max_pending: int = 50_000
    max_settled: int = 20_000
    max_feedback: int = 64
    max_dead_letter_bytes: int = 900_000
    user_cap_per_partition: int = 1000
    user_cap_window_ms: int = 3_600_000
    weights: dict[str, float] = field(default_factory=dict)
    params: RewardParams = field(default_factory=RewardParams)
    generations_topic: str = "generations.v1"
    feedback_topic: str = "feedback.v1"
    model_scores: ScoreLookup | None = None
    """Reward-model scores read at settle time; None: the reward_model component is off."""
    reward_model_for_all: bool = False
    """Add the reward_model component to every sample, not only to those without explicit feedback."""
    mine_preferences: bool = False
    """Collect each settled generation in `BatchOutput.outcomes` for preference mining."""

    @classmethod
    def from_settings(cls, s: object, partitions: int) -> JoinConfig:
        """Build from a `StreamsSettings` (`partitions`: the join topics' partition count)."""
        ms = lambda seconds: int(seconds * 1000)  # noqa: E731
        prefix = s.topic_prefix  # type: ignore[attr-defined]
        return cls(
            settle_window_ms=ms(s.settle_window_s),  # type: ignore[attr-defined]
            generation_ttl_ms=ms(s.generation_ttl_s),  # type: ignore[attr-defined]
            orphan_feedback_ttl_ms=ms(s.orphan_feedback_ttl_s),  # type: ignore[attr-defined]
            correction_window_ms=ms(s.correction_window_s),  # type: ignore[attr-defined]
            max_clock_skew_ms=ms(s.max_clock_skew_s),  # type: ignore[attr-defined]
            max_pending=s.max_pending_generations,  # type: ignore[attr-defined]
            max_settled=s.max_settled_keys,  # type: ignore[attr-defined]
            max_feedback=s.max_feedback_per_generation,  # type: ignore[attr-defined]
            max_dead_letter_bytes=s.max_dead_letter_bytes,  # type: ignore[attr-defined]
            user_cap_per_partition=math.ceil(s.user_cap_samples_per_window / partitions),  # type: ignore[attr-defined]
            user_cap_window_ms=ms(s.user_cap_window_s),  # type: ignore[attr-defined]
            weights={**s.reward_weights, "reward_model": s.reward_model_weight},  # type: ignore[attr-defined]
            params=RewardParams.from_settings(s),
            generations_topic=f"{prefix}generations.v1",
            feedback_topic=f"{prefix}feedback.v1",
            reward_model_for_all=s.reward_model_for == "all",  # type: ignore[attr-defined]
            mine_preferences=s.preferences_enabled,  # type: ignore[attr-defined]
        )


class Entry:
    """The join state of one generation id."""

    __slots__ = ("created_ms", "fb_ids", "fb_raw", "fbs", "first_fb_ms", "gen", "gen_raw", "sample_id", "settled_ms")

    def __init__(self, created_ms: int) -> None:
        self.gen: Generation | None = None
        self.gen_raw: bytes | None = None
        self.fbs: list[Feedback] = []
        self.fb_raw: list[bytes] = []
        self.fb_ids: set[str] = set()
        self.first_fb_ms: int | None = None
        self.created_ms = created_ms
        self.settled_ms: int | None = None
        """Event clock when it settled or expired; None while pending."""
        self.sample_id: str | None = None
        """The last sample emitted for it; None when none was (pending, dropped, capped)."""

    def add_feedback(self, fb: Feedback, raw: bytes) -> None:
        self.fbs.append(fb)
        self.fb_raw.append(raw)
        self.fb_ids.add(fb.event_id)
        if self.first_fb_ms is None:
            self.first_fb_ms = fb.event_time_ms

    def due_ms(self, cfg: JoinConfig) -> int:
        """When this pending entry settles or expires on the event clock."""
        if self.gen is None:
            return self.created_ms + cfg.orphan_feedback_ttl_ms
        if self.first_fb_ms is not None:
            return self.first_fb_ms + cfg.settle_window_ms
        return self.gen.event_time_ms + cfg.generation_ttl_ms


@dataclass
class PartitionState:
    """The join state of one partition: pending and settled keys, deadlines, clock."""

    partition: int
    pending: dict[str, Entry] = field(default_factory=dict)
    """Unsettled keys in insertion order (oldest first)."""
    settled: dict[str, Entry] = field(default_factory=dict)
    """Settled, expired or capped keys in settle order, kept for corrections."""
    deadlines: list[tuple[int, str]] = field(default_factory=list)
    """Heap of (due_ms, generation_id); stale entries are skipped when popped."""
    max_event_ms: int = 0
    wall_at_max_ms: int = 0
    user_window: int = -1
    user_counts: dict[str, int] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)
    """Keys changed since the last changelog write."""

    def clock_ms(self, wall_ms: int) -> int:
        """The partition's event clock: max event time, advanced by idle wall time."""
        return self.max_event_ms + max(0, wall_ms - self.wall_at_max_ms)

    def schedule(self, gid: str, entry: Entry, cfg: JoinConfig) -> None:
        heapq.heappush(self.deadlines, (entry.due_ms(cfg), gid))


@dataclass
class Record:
    """One consumed message: which topic (GEN or FB), where from, and its bytes."""

    source: int
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass
class BatchOutput:
    """What one batch (or tick) produces, in the order it must be written."""

    samples: list[tuple[int, bytes, bytes]] = field(default_factory=list)
    """(partition, key, value) for samples.v1."""
    changelog: list[tuple[int, bytes, bytes | None]] = field(default_factory=list)
    """(partition, key, value or None for a tombstone) for the changelog topic."""
    dead_letters: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    """(key, value) for dlq.v1."""
    counts: Counter[str] = field(default_factory=Counter)
    to_score: list[Generation] = field(default_factory=list)
    """New pending generations, for the reward model to score (when `cfg.model_scores` is set)."""
    outcomes: list[tuple[int, Outcome]] = field(default_factory=list)
    """(partition, settled generation) of every sample but corrections (when `cfg.mine_preferences`)."""


def sample_id(generation_id: str, reason: str, feedback_ids: list[str]) -> str:
    """The deterministic id of a sample (32 hex characters)."""
    text = "\x1f".join([generation_id, reason, *sorted(feedback_ids)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _dead(
    out: BatchOutput, err: InvalidEvent, topic: str, key: bytes | None, partition: int, offset: int, cfg: JoinConfig
) -> None:
    key = None if key is None else key[:1024]
    value = encode(
        dead_letter(err, source_topic=topic, rejected_by=REJECTED_BY, key=key, partition=partition, offset=offset)
    )
    if len(value) > cfg.max_dead_letter_bytes:
        keep = cfg.max_dead_letter_bytes * 3 // 4 - 8192
        note = f"{err.reason} (original of {len(err.raw)} bytes truncated to its first {keep})"
        cut = InvalidEvent(note, err.field, err.raw[:keep])
        value = encode(
            dead_letter(cut, source_topic=topic, rejected_by=REJECTED_BY, key=key, partition=partition, offset=offset)
        )
        out.counts["dead_letters_truncated"] += 1
    out.dead_letters.append((key, value))
    out.counts["dead_letters"] += 1


def _settle(st: PartitionState, gid: str, e: Entry, reason: str, at_ms: int, cfg: JoinConfig, out: BatchOutput) -> None:
    """Emit the sample of a pending entry (unless capped or dropped) and move it to settled."""
    st.pending.pop(gid, None)
    st.settled.pop(gid, None)
    e.settled_ms = at_ms
    st.settled[gid] = e
    st.dirty.add(gid)
    if (
        reason == _TTL
        and cfg.params.ttl_implicit_reward is None
        and (cfg.model_scores is None or cfg.model_scores.get(gid) is None)
    ):
        e.sample_id = None
        out.counts["expired_dropped"] += 1
        return
    gen = e.gen
    assert gen is not None
    window = at_ms // cfg.user_cap_window_ms
    if window != st.user_window:
        st.user_window, st.user_counts = window, {}
    used = st.user_counts.get(gen.user_id, 0)
    if used >= cfg.user_cap_per_partition:
        e.sample_id = None
        out.counts["capped"] += 1
        return
    st.user_counts[gen.user_id] = used + 1
    _emit(st, gid, e, reason, at_ms, cfg, out, corrects=None)


def _emit(
    st: PartitionState,
    gid: str,
    e: Entry,
    reason: str,
    at_ms: int,
    cfg: JoinConfig,
    out: BatchOutput,
    corrects: str | None,
) -> None:
    gen = e.gen
    assert gen is not None
    score = _model_score(gid, e, cfg, out)
    parts = components(RewardInput(gen.completion, e.fbs, reason, cfg.params, score))
    fb_ids = [fb.event_id for fb in e.fbs]
    sid = sample_id(gid, reason, fb_ids)
    sample = {
        "schema_version": 1,
        "event_id": sid,
        "event_time_ms": at_ms,
        "tenant_id": gen.tenant_id,
        "generation_id": gid,
        "model": gen.model,
        "policy_version": gen.policy_version,
        "prompt": gen.prompt,
        "completion": gen.completion,
        "prompt_token_ids": _json_array(gen.prompt_token_ids),
        "completion_token_ids": _json_array(gen.completion_token_ids),
        "completion_logprobs": _json_array(gen.completion_logprobs),
        "reward": composite(parts, cfg.weights, cfg.params.reward_clip),
        "reward_components": parts,
        "feedback_event_ids": fb_ids,
        "settle_reason": reason,
        "user_id": gen.user_id,
        "generated_at_ms": gen.event_time_ms,
        "first_feedback_ms": _first_feedback_ms(e),
    }
    if corrects is not None:
        sample["corrects_event_id"] = corrects
        out.counts["corrections"] += 1
    e.sample_id = sid
    out.samples.append((st.partition, gid.encode(), orjson.dumps(sample)))
    out.counts["samples"] += 1
    if cfg.mine_preferences and corrects is None:
        out.outcomes.append((st.partition, _outcome(gen, e, at_ms)))


def _json_array(value: JsonArray | list) -> orjson.Fragment | list:
    """A generation's array as orjson encodes it: the original bytes of a `JsonArray`
    (the fast path), the list itself otherwise (a generation pydantic decoded)."""
    return value.fragment() if value.__class__ is JsonArray else value


def _first_feedback_ms(e: Entry) -> int | None:
    """The earliest event time of the entry's feedback (None without feedback)."""
    first = None
    for fb in e.fbs:
        t = fb.event_time_ms
        if first is None or t < first:
            first = t
    return first


def _model_score(gid: str, e: Entry, cfg: JoinConfig, out: BatchOutput) -> float | None:
    """The reward model's score for this sample, if asked for and ready (else counted)."""
    if cfg.model_scores is None:
        return None
    if not cfg.reward_model_for_all and any(fb.kind in EXPLICIT_KINDS for fb in e.fbs):
        return None
    score = cfg.model_scores.get(gid)
    if score is None:
        out.counts["reward_model_skipped"] += 1
    return score


def _outcome(gen: Generation, e: Entry, at_ms: int) -> Outcome:
    return Outcome(
        generation_id=gen.generation_id,
        tenant_id=gen.tenant_id,
        user_id=gen.user_id,
        model=gen.model,
        policy_version=gen.policy_version,
        prompt=gen.prompt,
        completion=gen.completion,
        generated_at_ms=gen.event_time_ms,
        settled_at_ms=at_ms,
        feedback=tuple(e.fbs),
    )


def _on_generation(st: PartitionState, gen: Generation, raw: bytes, rec: Record, cfg: JoinConfig, out: BatchOutput):
    gid = gen.generation_id
    e = st.pending.get(gid) or st.settled.get(gid)
    if e is not None and e.gen is not None:
        if e.gen.event_id == gen.event_id:
            out.counts["duplicates"] += 1
        else:
            err = InvalidEvent(
                f"generation_id {gid} was already seen with event {e.gen.event_id}", "generation_id", raw
            )
            _dead(out, err, cfg.generations_topic, rec.key, rec.partition, rec.offset, cfg)
        return
    if e is None:
        e = Entry(gen.event_time_ms)
        st.pending[gid] = e
    e.gen, e.gen_raw, e.created_ms = gen, raw, gen.event_time_ms
    st.dirty.add(gid)
    terminal = next((fb for fb in e.fbs if fb.is_terminal), None)
    if terminal is not None:
        _settle(st, gid, e, _TERMINAL, terminal.event_time_ms, cfg, out)
    else:
        st.schedule(gid, e, cfg)
        if cfg.model_scores is not None:
            out.to_score.append(gen)


def _on_feedback(st: PartitionState, fb: Feedback, raw: bytes, rec: Record, cfg: JoinConfig, out: BatchOutput):
    gid = fb.generation_id
    e = st.pending.get(gid)
    if e is None and gid in st.settled:
        _on_late_feedback(st, gid, st.settled[gid], fb, raw, rec, cfg, out)
        return
    if e is not None and fb.event_id in e.fb_ids:
        out.counts["duplicates"] += 1
        return
    if e is not None and len(e.fbs) >= cfg.max_feedback:
        err = InvalidEvent(f"more than {cfg.max_feedback} feedback events for {gid}", "generation_id", raw)
        _dead(out, err, cfg.feedback_topic, rec.key, rec.partition, rec.offset, cfg)
        return
    if e is None:
        e = Entry(fb.event_time_ms)
        st.pending[gid] = e
    first = e.first_fb_ms is None
    e.add_feedback(fb, raw)
    st.dirty.add(gid)
    if e.gen is None:
        if first:
            st.schedule(gid, e, cfg)
    elif fb.is_terminal:
        _settle(st, gid, e, _TERMINAL, fb.event_time_ms, cfg, out)
    elif first:
        st.schedule(gid, e, cfg)


def _on_late_feedback(
    st: PartitionState,
    gid: str,
    e: Entry,
    fb: Feedback,
    raw: bytes,
    rec: Record,
    cfg: JoinConfig,
    out: BatchOutput,
) -> None:
    if fb.event_id in e.fb_ids:
        out.counts["duplicates"] += 1
        return
    if len(e.fbs) >= cfg.max_feedback:
        err = InvalidEvent(f"more than {cfg.max_feedback} feedback events for {gid}", "generation_id", raw)
        _dead(out, err, cfg.feedback_topic, rec.key, rec.partition, rec.offset, cfg)
        return
    e.add_feedback(fb, raw)
    st.dirty.add(gid)
    if e.sample_id is None:
        # Dropped at its TTL or capped: the key reopens as pending with this feedback.
        del st.settled[gid]
        e.settled_ms = None
        e.first_fb_ms = fb.event_time_ms
        st.pending[gid] = e
        out.counts["reopened"] += 1
        if fb.is_terminal:
            _settle(st, gid, e, _TERMINAL, fb.event_time_ms, cfg, out)
        else:
            st.schedule(gid, e, cfg)
        return
    _emit(st, gid, e, _CORRECTION, fb.event_time_ms, cfg, out, corrects=e.sample_id)


def _decode(rec: Record, cfg: JoinConfig, out: BatchOutput) -> Generation | Feedback | None:
    """Validate one record (schemas.fast: the pydantic contract's verdict, fast), or
    dead-letter it and return None."""
    raw = rec.value
    try:
        if raw is None:
            raise InvalidEvent("empty message value", None, b"")
        event = decode_generation(raw) if rec.source == GEN else decode_feedback(raw)
        if rec.key is not None and rec.key != event.generation_id.encode():
            raise InvalidEvent(
                f"message key {rec.key[:64]!r} is not the generation_id (co-partitioning needs it)",
                "generation_id",
                raw,
            )
    except InvalidEvent as err:
        topic = cfg.generations_topic if rec.source == GEN else cfg.feedback_topic
        _dead(out, err, topic, rec.key, rec.partition, rec.offset, cfg)
        return None
    return event


def process_batch(
    states: dict[int, PartitionState], records: list[Record], wall_ms: int, cfg: JoinConfig
) -> BatchOutput:
    """Join one batch: validate, update the partitions' states, settle what is due.

    `states` must hold a state for every partition that appears in `records`; every
    state is advanced to its event clock (the wall-clock tick), whether it had records
    or not. Returns samples, changelog records (final value per changed key) and dead
    letters; the caller writes them all before it commits the batch's offsets.
    """
    out = BatchOutput()
    max_future = wall_ms + cfg.max_clock_skew_ms
    n_gen = n_fb = 0
    decode_gen, decode_fb = GENERATION_SPLICE_DECODER.decode, FEEDBACK_DECODER.decode
    for rec in records:
        # the strict fast path inline; anything it refuses gets the contract's verdict in _decode
        raw, key = rec.value, rec.key
        event = None
        if raw is not None and len(raw) <= MAX_MESSAGE_BYTES:
            try:
                event = decode_gen(raw) if rec.source == GEN else decode_fb(raw)
            except FAST_ERRORS:
                event = None
        if event is None or (key is not None and key != event.generation_id.encode()):
            event = _decode(rec, cfg, out)
            if event is None:
                continue
        st = states[rec.partition]
        t = event.event_time_ms
        if t > max_future:
            err = InvalidEvent(
                f"event time {t} is more than max_clock_skew_s ahead of the wall clock",
                "event_time_ms",
                rec.value or b"",
            )
            topic = cfg.generations_topic if rec.source == GEN else cfg.feedback_topic
            _dead(out, err, topic, rec.key, rec.partition, rec.offset, cfg)
            continue
        if t > st.max_event_ms:
            st.max_event_ms, st.wall_at_max_ms = t, wall_ms
        if rec.source == GEN:
            n_gen += 1
            _on_generation(st, event, rec.value, rec, cfg, out)  # type: ignore[arg-type]
        else:
            n_fb += 1
            _on_feedback(st, event, rec.value, rec, cfg, out)  # type: ignore[arg-type]
    counts = out.counts
    counts["consumed"] += len(records)
    if n_gen:
        counts["generations"] += n_gen
    if n_fb:
        counts["feedback"] += n_fb
    for st in states.values():
        advance(st, wall_ms, cfg, out)
    return out


def advance(st: PartitionState, wall_ms: int, cfg: JoinConfig, out: BatchOutput) -> None:
    """Settle or expire what is due on the partition's clock, enforce the bounds, and
    append the changelog records of every key changed since the last call."""
    clock = st.clock_ms(wall_ms)
    heap = st.deadlines
    while heap and heap[0][0] <= clock:
        _, gid = heapq.heappop(heap)
        e = st.pending.get(gid)
        if e is None:
            continue
        due = e.due_ms(cfg)
        if due > clock:
            continue  # a later deadline for it is in the heap
        _expire(st, gid, e, due, cfg, out)
    while len(st.pending) > cfg.max_pending:
        gid, e = next(iter(st.pending.items()))
        out.counts["evicted"] += 1
        _expire(st, gid, e, clock, cfg, out)
    horizon = clock - cfg.correction_window_ms
    settled = st.settled
    while settled:
        gid, e = next(iter(settled.items()))
        if len(settled) <= cfg.max_settled and (e.settled_ms or 0) > horizon:
            break
        del settled[gid]
        st.dirty.add(gid)
    _write_changelog(st, out)


def _expire(st: PartitionState, gid: str, e: Entry, at_ms: int, cfg: JoinConfig, out: BatchOutput) -> None:
    if e.gen is None:
        del st.pending[gid]
        st.dirty.add(gid)
        out.counts["orphans_expired"] += 1
        for raw in e.fb_raw:
            reason = f"orphan feedback: generation {gid} unknown or forgotten (orphan_feedback_ttl_s passed)"
            _dead(
                out, InvalidEvent(reason, "generation_id", raw), cfg.feedback_topic, gid.encode(), st.partition, -1, cfg
            )
    elif e.fbs:
        _settle(st, gid, e, _WINDOW, at_ms, cfg, out)
    else:
        _settle(st, gid, e, _TTL, at_ms, cfg, out)


META_KEY = b"\x00meta"
"""Changelog key of the partition's clock (no generation id can contain NUL)."""


def _write_changelog(st: PartitionState, out: BatchOutput) -> None:
    from streams.changelog import encode_entry, encode_meta

    if not st.dirty:
        return
    p = st.partition
    for gid in st.dirty:
        e = st.pending.get(gid) or st.settled.get(gid)
        out.changelog.append((p, gid.encode(), None if e is None else encode_entry(e)))
    out.changelog.append((p, META_KEY, encode_meta(st)))
    st.dirty.clear()
