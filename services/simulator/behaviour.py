"""What one simulated user does after seeing a completion: a pure function of a random
generator, the acceptance probability and the user's habits.

It turns "the user accepts with probability p" into the mix a real product sees:
explicit signals (thumbs, ratings) from some users, implicit ones (accept/reject,
copy, regenerate, dwell) from most, noise, duplicates, delays that reorder events, and
users who never say anything.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from schemas.events import FeedbackEvent, FeedbackKind, new_event_id, now_ms


@dataclass(frozen=True)
class Habits:
    """How a user gives feedback (drawn once per user)."""

    silent: bool
    """Never gives any feedback."""
    explicit_rate: float
    """Probability of a thumb or rating on a given answer."""
    terminal_rate: float
    """Probability of an explicit accept/reject action (else the settle window decides)."""
    noise: float
    """Probability that an explicit signal contradicts the decision."""


def draw_habits(rng: random.Random, silent_share: float) -> Habits:
    """A user's habits."""
    return Habits(
        silent=rng.random() < silent_share,
        explicit_rate=rng.uniform(0.1, 0.6),
        terminal_rate=rng.uniform(0.6, 0.95),
        noise=rng.uniform(0.0, 0.08),
    )


@dataclass(frozen=True)
class Planned:
    """A feedback event and how long after the answer the user sends it."""

    delay_s: float
    event: FeedbackEvent


def react(
    rng: random.Random,
    *,
    p_accept: float,
    habits: Habits,
    generation_id: str,
    user_id: str,
    completion: str,
    max_delay_s: float,
    duplicate_rate: float,
) -> tuple[bool, list[Planned]]:
    """Decide whether the user accepts, and the feedback events that show it."""
    accepted = rng.random() < p_accept
    if habits.silent:
        return accepted, []
    out: list[Planned] = []

    def plan(kind: FeedbackKind, value: float | None = None, **extra: object) -> None:
        event = FeedbackEvent(
            event_id=new_event_id(),
            event_time_ms=now_ms(),
            generation_id=generation_id,
            user_id=user_id,
            kind=kind,
            value=value,
            **extra,
        )
        out.append(Planned(rng.uniform(0.0, max_delay_s), event))

    shown = accepted if rng.random() >= habits.noise else not accepted
    if rng.random() < habits.explicit_rate:
        if rng.random() < 0.5:
            plan(FeedbackKind.THUMB, 1.0 if shown else -1.0)
        else:
            plan(FeedbackKind.RATING, float(rng.choice([4, 5]) if shown else rng.choice([1, 2])))
    if accepted:
        if rng.random() < 0.3:
            plan(FeedbackKind.COPY)
        if rng.random() < 0.3:
            plan(FeedbackKind.DWELL, round(rng.uniform(3.0, 40.0), 1))
    elif rng.random() < 0.3:
        plan(FeedbackKind.REGENERATE)
    if rng.random() < habits.terminal_rate:
        # The decision comes after the other signals, as a user reads first, then acts.
        plan(FeedbackKind.ACCEPT if accepted else FeedbackKind.REJECT)
        out[-1] = Planned(max_delay_s + rng.uniform(0.0, max_delay_s), out[-1].event)
    if out and rng.random() < duplicate_rate:
        twin = rng.choice(out)
        out.append(Planned(twin.delay_s + rng.uniform(0.0, max_delay_s), twin.event))
    return accepted, out
