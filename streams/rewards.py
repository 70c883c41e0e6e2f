"""Reward functions in a registry, and the composite reward built from their weights.

Each function looks at one generation's feedback and returns its component, or None when
its signal is absent. The composite reward is `clip(sum(weight[name] * component[name]))`
with the weights from `StreamsSettings.reward_weights` (environment or a JSON file).
Every sample keeps the raw components, so the reward can be audited and recomputed.

| component | value |
|---|---|
| thumb | the latest thumb: +1 or -1 |
| rating | the latest rating r in 1..5, normalised to (r - 3) / 2 in [-1, 1] |
| accept | `accept_reward` (+0.75) when the latest accept/reject is an accept |
| reject | `reject_reward` (-0.25) when the latest accept/reject is a reject |
| edit_similarity | 2·LCS / (words of both) of the completion and the latest edit, in [0, 1] |
| copy | `copy_reward` when the user copied the completion |
| regenerate | `regenerate_reward` when the user asked for another completion |
| dwell | longest dwell / `dwell_saturation_s`, capped at 1 |
| ttl_implicit | `ttl_implicit_reward` for a generation settled by its TTL without feedback |
| reward_model | the reward model's score of the completion, when scoring is on and the score was ready at settle time |

"Latest" means the largest (event_time_ms, arrival order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from rapidfuzz.distance import Indel

from schemas.events import FeedbackKind, SettleReason

# The kinds and reasons as plain strings (FeedbackKind.X is a Python-level lookup per use
# on Python 3.11; the feedback objects hold plain strings, which compare equal).
_THUMB = (FeedbackKind.THUMB.value,)
_RATING = (FeedbackKind.RATING.value,)
_ACCEPT_OR_REJECT = (FeedbackKind.ACCEPT.value, FeedbackKind.REJECT.value)
_ACCEPT, _REJECT = _ACCEPT_OR_REJECT
_EDIT = (FeedbackKind.EDIT.value,)
_COPY = (FeedbackKind.COPY.value,)
_REGENERATE = (FeedbackKind.REGENERATE.value,)
_DWELL = FeedbackKind.DWELL.value
_TTL = SettleReason.TTL.value


class FeedbackLike(Protocol):
    kind: str
    value: float | None
    edited_text: str | None
    event_time_ms: int


@dataclass(frozen=True)
class RewardParams:
    """The reward knobs of `StreamsSettings`, as the pure functions see them."""

    accept_reward: float = 0.75
    reject_reward: float = -0.25
    copy_reward: float = 0.5
    regenerate_reward: float = -0.5
    dwell_saturation_s: float = 30.0
    edit_similarity_max_chars: int = 20_000
    ttl_implicit_reward: float | None = None
    reward_clip: float = 10.0

    @classmethod
    def from_settings(cls, settings: object) -> RewardParams:
        """Pick the reward fields out of a `StreamsSettings`."""
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


@dataclass(slots=True)
class RewardInput:
    """What a reward function sees: the completion, its feedback (deduplicated, in
    arrival order) and how the reward settled. Built once per sample on the join's hot
    path: a plain slotted class (a frozen dataclass's __init__ cost more than the reward
    functions together); the reward functions only read it."""

    completion: str
    feedback: Sequence[FeedbackLike]
    settle_reason: str
    params: RewardParams
    model_score: float | None = None
    """The reward model's score of this generation (None: scoring off, not ready, or not asked for)."""
    _by_kind: dict[str, tuple[int, int, FeedbackLike]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def latest_by_kind(self) -> dict[str, tuple[int, int, FeedbackLike]]:
        """kind -> (event_time_ms, arrival index, feedback) of the latest feedback of that
        kind; computed once per input, whatever number of reward functions read it."""
        out = self._by_kind
        if out is not None:
            return out
        out = {}
        for i, fb in enumerate(self.feedback):
            kind = fb.kind
            prev = out.get(kind)
            if prev is None or fb.event_time_ms >= prev[0]:  # a later arrival wins a tie
                out[kind] = (fb.event_time_ms, i, fb)
        self._by_kind = out
        return out


RewardFn = Callable[[RewardInput], float | None]
REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Add a reward function to the registry under `name` (a reward_weights key)."""

    def deco(fn: RewardFn) -> RewardFn:
        REGISTRY[name] = fn
        return fn

    return deco


def _order(entry: tuple[int, int, FeedbackLike]) -> tuple[int, int]:
    return entry[0], entry[1]


def _latest(inp: RewardInput, kinds: tuple[str, ...]) -> FeedbackLike | None:
    """The latest feedback of one of `kinds`: largest (event_time_ms, arrival index)."""
    by_kind = inp.latest_by_kind
    if len(kinds) == 1:
        entry = by_kind.get(kinds[0])
        return None if entry is None else entry[2]
    found = [by_kind[k] for k in kinds if k in by_kind]
    if not found:
        return None
    return max(found, key=_order)[2] if len(found) > 1 else found[0][2]


@register("thumb")
def thumb(inp: RewardInput) -> float | None:
    """The latest thumb, +1 or -1."""
    fb = _latest(inp, _THUMB)
    return None if fb is None else float(fb.value or 0.0)


@register("rating")
def rating(inp: RewardInput) -> float | None:
    """The latest 1-5 rating normalised to [-1, 1]."""
    fb = _latest(inp, _RATING)
    return None if fb is None else (float(fb.value or 3.0) - 3.0) / 2.0


@register("accept")
def accept(inp: RewardInput) -> float | None:
    """accept_reward when the latest accept/reject is an accept."""
    fb = _latest(inp, _ACCEPT_OR_REJECT)
    return inp.params.accept_reward if fb is not None and fb.kind == _ACCEPT else None


@register("reject")
def reject(inp: RewardInput) -> float | None:
    """reject_reward when the latest accept/reject is a reject."""
    fb = _latest(inp, _ACCEPT_OR_REJECT)
    return inp.params.reject_reward if fb is not None and fb.kind == _REJECT else None


def edit_similarity_of(completion: str, edited: str, max_chars: int) -> float:
    """Word-level similarity in [0, 1] of two texts: 2 * LCS / (len(a) + len(b)) over their
    whitespace-separated words (LCS: the longest common subsequence of words), the
    normalised Indel similarity; 1 for two empty texts, 0 when no word is shared.

    Computed by rapidfuzz (C++, bit-parallel LCS). It is the formula of difflib's
    `SequenceMatcher.ratio` (2 * M / T) with M the true LCS, where difflib's greedy
    matching blocks can find fewer (e.g. "d a c d" vs "a d": LCS "a d", 2 * 2 / 6 = 2/3
    here; difflib matches only the first "d", 1/3).
    """
    a, b = completion[:max_chars].split(), edited[:max_chars].split()
    if not a and not b:
        return 1.0
    return Indel.normalized_similarity(a, b)


@register("edit_similarity")
def edit_similarity(inp: RewardInput) -> float | None:
    """Similarity of the completion and the latest edited text."""
    fb = _latest(inp, _EDIT)
    if fb is None:
        return None
    return edit_similarity_of(inp.completion, fb.edited_text or "", inp.params.edit_similarity_max_chars)


@register("copy")
def copy(inp: RewardInput) -> float | None:
    """copy_reward when the completion was copied."""
    return inp.params.copy_reward if _latest(inp, _COPY) is not None else None


@register("regenerate")
def regenerate(inp: RewardInput) -> float | None:
    """regenerate_reward when the user asked for another completion."""
    return inp.params.regenerate_reward if _latest(inp, _REGENERATE) is not None else None


@register("dwell")
def dwell(inp: RewardInput) -> float | None:
    """Longest dwell over dwell_saturation_s, capped at 1."""
    values = [fb.value or 0.0 for fb in inp.feedback if fb.kind == _DWELL]
    return None if not values else min(max(values) / inp.params.dwell_saturation_s, 1.0)


@register("ttl_implicit")
def ttl_implicit(inp: RewardInput) -> float | None:
    """ttl_implicit_reward for a generation that expired without feedback."""
    if inp.settle_reason == _TTL and not inp.feedback:
        return inp.params.ttl_implicit_reward
    return None


@register("reward_model")
def reward_model(inp: RewardInput) -> float | None:
    """The reward model's score, when the stream had one ready at settle time."""
    return inp.model_score


def components(inp: RewardInput) -> dict[str, float]:
    """Every registered component that applies to this input."""
    out = {}
    for name, fn in REGISTRY.items():
        value = fn(inp)
        if value is not None:
            out[name] = float(value)
    return out


def composite(parts: dict[str, float], weights: dict[str, float], clip: float) -> float:
    """The weighted sum of the components, clipped to [-clip, clip]."""
    total = 0.0
    for name, value in parts.items():
        total += weights.get(name, 0.0) * value
    return max(-clip, min(clip, total))
