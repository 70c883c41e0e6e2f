"""Reward functions after the hot-path work: the edit similarity (rapidfuzz, LCS over
words) with hand-computed values, and "latest" computed once per input."""

from __future__ import annotations

import pytest

from schemas.events import FeedbackEvent
from streams import rewards
from streams.rewards import RewardInput, RewardParams, composite, edit_similarity_of

T0 = 1_700_000_000_000


def fb(eid: str, kind: str, t: int = T0, **kw) -> FeedbackEvent:
    return FeedbackEvent(event_id=eid, event_time_ms=t, generation_id="g", kind=kind, user_id="u", **kw)


@pytest.mark.parametrize(
    ("completion", "edited", "expected"),
    [
        # 2 * LCS / (len(a) + len(b)), over whitespace-separated words
        ("the quick brown fox", "the quick red fox", 2 * 3 / 8),
        ("the cat sat", "the cat sat down", 2 * 3 / 7),
        ("a b", "b a", 2 * 1 / 4),
        ("a b c", "c a b", 2 * 2 / 6),
        # difflib's matching blocks give 1/3 here (only the first "d"); the LCS is "a d"
        ("d a c d", "a d", 2 * 2 / 6),
        ("same  words\nhere", "same words here", 1.0),  # whitespace is not a word
        ("one two", "three four", 0.0),
        ("", "", 1.0),
        ("", "something", 0.0),
        ("Case", "case", 0.0),  # words compare exactly
    ],
)
def test_edit_similarity_hand_computed(completion: str, edited: str, expected: float) -> None:
    assert edit_similarity_of(completion, edited, 1000) == pytest.approx(expected, abs=1e-12)
    assert 0.0 <= edit_similarity_of(completion, edited, 1000) <= 1.0


def test_edit_similarity_looks_at_the_first_max_chars_only() -> None:
    # "a b c d" cut to 3 characters is "a b"; against "a b": identical
    assert edit_similarity_of("a b c d", "a b", 3) == 1.0


def test_latest_is_by_event_time_then_arrival() -> None:
    params = RewardParams()
    # same event time: the later arrival wins; an earlier event time loses whatever its arrival
    tie = [fb("a", "thumb", t=T0, value=1), fb("b", "thumb", t=T0, value=-1)]
    assert rewards.thumb(RewardInput("x", tie, "window", params)) == -1.0
    late_first = [fb("a", "rating", t=T0 + 5, value=5), fb("b", "rating", t=T0, value=1)]
    assert rewards.rating(RewardInput("x", late_first, "window", params)) == 1.0
    # accept vs reject: the latest of the two kinds decides
    both = [fb("a", "accept", t=T0 + 9), fb("b", "reject", t=T0 + 9)]
    assert rewards.components(RewardInput("x", both, "terminal", params)) == {"reject": -0.25}
    edits = [
        fb("a", "edit", t=T0 + 1, edited_text="x y", final=False),
        fb("b", "edit", t=T0 + 1, edited_text="q", final=True),
    ]
    assert rewards.components(RewardInput("x y", edits, "terminal", params)) == {"edit_similarity": 0.0}


def test_composite_is_the_weighted_sum_in_order() -> None:
    assert composite({}, {"thumb": 1.0}, 10.0) == 0.0
    assert composite({"thumb": -1.0, "accept": 0.75}, {"thumb": 1.0, "accept": 1.0}, 10.0) == -0.25
    assert composite({"thumb": -1.0}, {"thumb": 50.0}, 10.0) == -10.0
