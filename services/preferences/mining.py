"""Preference mining: pure functions from settled generations (with their feedback) to
preference events, and the small keyed state that pairs generations of one prompt.

What is mined when a generation settles (`Outcome`):

| kind | chosen ≻ rejected | needs |
|---|---|---|
| edit | the user's final edited text ≻ the completion | an edit whose text differs |
| regenerate_accept | the accepted completion ≻ an earlier one the user regenerated | state |
| accept_reject | the accepted completion ≻ a rejected one | state |
| rating | the higher-rated completion ≻ the lower-rated one (margin = difference / 4) | state |
| thumb | the thumbed-up completion ≻ a thumbed-down one | state |
| unpaired | a thumbed-up completion alone (chosen) or a thumbed-down one alone (rejected), for a KTO-style loss | |

"state" pairs need an earlier generation of the same tenant, user and prompt: `PairState`
keeps the last `max_per_key` outcomes of each (tenant, user, prompt) for `window_ms`
(event time) and at most `max_keys` keys (the least recently used go first). It is a
worker's memory, not a partition's: the join partitions by generation id, so two
generations of one prompt usually sit on different partitions. The consequences, by
design: with W workers about 1/W of such pairs meet on one worker; pairs that straddle a
restart or a rebalance are not found (the state is not in the changelog). Edit and
unpaired events need no state and are always mined.

Event ids are deterministic (sha256 of the kind and the generation and feedback ids
involved), so replaying a batch after a crash writes the same ids, which consumers drop.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from schemas.events import FeedbackKind, PreferenceKind


class FeedbackLike(Protocol):
    event_id: str
    kind: str
    value: float | None
    edited_text: str | None
    event_time_ms: int


@dataclass(frozen=True)
class Outcome:
    """One settled generation and the feedback it settled with."""

    generation_id: str
    tenant_id: str
    user_id: str
    model: str
    policy_version: int
    prompt: str
    completion: str
    generated_at_ms: int
    settled_at_ms: int
    feedback: Sequence[FeedbackLike] = ()


@dataclass(frozen=True)
class Signals:
    """What the feedback of one generation says, each None when absent."""

    accepted: bool | None
    """The latest accept (True) or reject (False)."""
    regenerated: bool
    rating: float | None
    thumb: float | None
    edited_text: str | None
    """The latest edit's text, when it differs from the completion (whitespace aside)."""


def _latest(feedback: Sequence[FeedbackLike], kinds: tuple[str, ...]) -> FeedbackLike | None:
    best, best_key = None, None
    for i, fb in enumerate(feedback):
        if fb.kind in kinds and (best_key is None or (fb.event_time_ms, i) >= best_key):
            best, best_key = fb, (fb.event_time_ms, i)
    return best


def signals(o: Outcome) -> Signals:
    """The preference-relevant signals of an outcome ("latest" as in streams.rewards)."""
    fb = o.feedback
    decision = _latest(fb, (FeedbackKind.ACCEPT, FeedbackKind.REJECT))
    rating = _latest(fb, (FeedbackKind.RATING,))
    thumb = _latest(fb, (FeedbackKind.THUMB,))
    edit = _latest(fb, (FeedbackKind.EDIT,))
    edited = None
    if edit is not None and edit.edited_text and " ".join(edit.edited_text.split()) != " ".join(o.completion.split()):
        edited = edit.edited_text
    return Signals(
        accepted=None if decision is None else decision.kind == FeedbackKind.ACCEPT,
        regenerated=any(f.kind == FeedbackKind.REGENERATE for f in fb),
        rating=None if rating is None else rating.value,
        thumb=None if thumb is None else thumb.value,
        edited_text=edited,
    )


@dataclass(frozen=True)
class Mined:
    """A preference, as the fields of a `PreferenceEvent` (see `to_event`)."""

    event_id: str
    kind: str
    generation_id: str
    """The generation whose settling mined it (the Kafka key)."""
    tenant_id: str
    user_id: str
    model: str
    prompt: str
    chosen: str | None
    rejected: str | None
    chosen_generation_id: str | None
    rejected_generation_id: str | None
    margin: float
    feedback_event_ids: tuple[str, ...]
    event_time_ms: int

    def to_event(self) -> dict:
        """The `PreferenceEvent` fields as a dict (JSON-ready)."""
        return {
            "schema_version": 1,
            "event_id": self.event_id,
            "event_time_ms": self.event_time_ms,
            "tenant_id": self.tenant_id,
            "generation_id": self.generation_id,
            "kind": self.kind,
            "model": self.model,
            "prompt": self.prompt,
            "chosen": self.chosen,
            "rejected": self.rejected,
            "chosen_generation_id": self.chosen_generation_id,
            "rejected_generation_id": self.rejected_generation_id,
            "margin": self.margin,
            "feedback_event_ids": list(self.feedback_event_ids),
            "user_id": self.user_id,
        }


def preference_id(kind: str, *parts: str) -> str:
    """Deterministic id of a preference (32 hex characters)."""
    return hashlib.sha256("\x1f".join([kind, *parts]).encode()).hexdigest()[:32]


def _fb_ids(*outcomes: Outcome) -> tuple[str, ...]:
    return tuple(sorted({f.event_id for o in outcomes for f in o.feedback}))


def _pair(kind: str, later: Outcome, chosen: Outcome, rejected: Outcome, margin: float = 1.0) -> Mined:
    return Mined(
        event_id=preference_id(kind, chosen.generation_id, rejected.generation_id),
        kind=kind,
        generation_id=later.generation_id,
        tenant_id=later.tenant_id,
        user_id=later.user_id,
        model=later.model,
        prompt=later.prompt,
        chosen=chosen.completion,
        rejected=rejected.completion,
        chosen_generation_id=chosen.generation_id,
        rejected_generation_id=rejected.generation_id,
        margin=margin,
        feedback_event_ids=_fb_ids(chosen, rejected),
        event_time_ms=later.settled_at_ms,
    )


def mine_single(o: Outcome, sig: Signals | None = None) -> list[Mined]:
    """Preferences one outcome gives on its own: its edit, and its thumb as an unpaired label."""
    sig = sig or signals(o)
    out: list[Mined] = []
    if sig.edited_text is None and sig.thumb is None:
        return out  # most outcomes: nothing to mine alone (and no ids to sort)
    base = {
        "generation_id": o.generation_id,
        "tenant_id": o.tenant_id,
        "user_id": o.user_id,
        "model": o.model,
        "prompt": o.prompt,
        "margin": 1.0,
        "feedback_event_ids": _fb_ids(o),
        "event_time_ms": o.settled_at_ms,
    }
    if sig.edited_text is not None:
        out.append(
            Mined(
                event_id=preference_id(PreferenceKind.EDIT, o.generation_id),
                kind=PreferenceKind.EDIT,
                chosen=sig.edited_text,
                rejected=o.completion,
                chosen_generation_id=None,
                rejected_generation_id=o.generation_id,
                **base,
            )
        )
    if sig.thumb is not None:
        up = sig.thumb > 0
        out.append(
            Mined(
                event_id=preference_id(PreferenceKind.UNPAIRED, o.generation_id),
                kind=PreferenceKind.UNPAIRED,
                chosen=o.completion if up else None,
                rejected=None if up else o.completion,
                chosen_generation_id=o.generation_id if up else None,
                rejected_generation_id=None if up else o.generation_id,
                **base,
            )
        )
    return out


def mine_pair(earlier: Outcome, later: Outcome) -> Mined | None:
    """The preference between two generations of one prompt and user (`later` settled
    last), if their feedback orders them. The first rule that applies wins: accept against regenerate or reject,
    then a rating difference, then opposite thumbs."""
    if earlier.completion == later.completion:
        return None
    a, b = signals(earlier), signals(later)
    for x, y, ox, oy in ((a, b, earlier, later), (b, a, later, earlier)):
        # generated before the accepted one (settle order can differ: an accept settles at once)
        regenerated_first = y.regenerated and y.accepted is None and oy.generated_at_ms <= ox.generated_at_ms
        if x.accepted is True and not x.regenerated and (y.accepted is False or regenerated_first):
            kind = PreferenceKind.ACCEPT_REJECT if y.accepted is False else PreferenceKind.REGENERATE_ACCEPT
            return _pair(kind, later, ox, oy)
    if a.rating is not None and b.rating is not None and a.rating != b.rating:
        hi, lo = (earlier, later) if a.rating > b.rating else (later, earlier)
        return _pair(PreferenceKind.RATING, later, hi, lo, abs(a.rating - b.rating) / 4.0)
    if a.thumb is not None and b.thumb is not None and a.thumb != b.thumb:
        hi, lo = (earlier, later) if a.thumb > b.thumb else (later, earlier)
        return _pair(PreferenceKind.THUMB, later, hi, lo)
    return None


def prompt_key(o: Outcome) -> tuple[str, str, str]:
    """The key generations are paired under: tenant, user and a hash of the prompt."""
    return (o.tenant_id, o.user_id, hashlib.blake2b(o.prompt.encode(), digest_size=16).hexdigest())


@dataclass
class PairState:
    """The last outcomes per (tenant, user, prompt), bounded in keys, per key and in time."""

    window_ms: int = 3_600_000
    """Outcomes settled longer ago than this (event time) are not paired any more."""
    max_keys: int = 100_000
    """Keys remembered; beyond it the least recently used key is forgotten."""
    max_per_key: int = 4
    """Outcomes remembered per key (the newest)."""
    keys: OrderedDict[tuple[str, str, str], deque[Outcome]] = field(default_factory=OrderedDict)
    evicted: int = 0

    def status(self) -> dict[str, int]:
        """Size counters for the worker's stats."""
        return {"preference_keys": len(self.keys), "preference_keys_evicted": self.evicted}

    def observe(self, o: Outcome) -> list[Mined]:
        """Mine an outcome against the remembered ones of its key, then remember it."""
        out = mine_single(o)
        key = prompt_key(o)
        seen = self.keys.pop(key, None) or deque(maxlen=self.max_per_key)
        horizon = o.settled_at_ms - self.window_ms
        paired: set[str] = set()
        for earlier in reversed(seen):
            if earlier.generation_id == o.generation_id or earlier.settled_at_ms < horizon:
                continue
            mined = mine_pair(earlier, o)
            if mined is not None and mined.event_id not in paired:
                paired.add(mined.event_id)
                out.append(mined)
        if all(e.generation_id != o.generation_id for e in seen):
            seen.append(o)
        self.keys[key] = seen
        while len(self.keys) > self.max_keys:
            self.keys.popitem(last=False)
            self.evicted += 1
        return out


def mine_sequence(outcomes: Sequence[Outcome], state: PairState | None = None) -> list[Mined]:
    """Every preference a sequence of settled outcomes gives, in settle order."""
    state = state or PairState()
    out: list[Mined] = []
    for o in outcomes:
        out.extend(state.observe(o))
    return out
