"""Simulated users: hidden preferences, the feedback mix, per-version statistics."""

from __future__ import annotations

import random

import pytest

from schemas.events import FeedbackKind
from services.simulator.behaviour import Habits, react
from services.simulator.preference import concise, load
from services.simulator.stats import VersionStats, wilson_interval

TALKER = Habits(silent=False, explicit_rate=1.0, terminal_rate=1.0, noise=0.0)


def test_concise_preference_rewards_short_but_not_empty_answers() -> None:
    assert concise("q", "A cat named Whiskers.") == 0.9
    assert concise("q", "") == 0.1
    assert concise("q", "Yes.") == 0.1
    assert concise("q", " ".join(["word"] * 40)) == 0.1


def test_load_preference_checks_the_plug_in() -> None:
    assert load("services.simulator.preference:concise") is concise
    with pytest.raises(ValueError, match="MODULE:CALLABLE"):
        load("services.simulator.preference")
    with pytest.raises(ValueError, match="failed on a probe"):
        load("builtins:len")
    with pytest.raises(ValueError, match="not a probability"):
        load("builtins:max")


def _react(rng: random.Random, p: float, habits: Habits = TALKER, duplicate_rate: float = 0.0):
    return react(
        rng,
        p_accept=p,
        habits=habits,
        generation_id="g",
        user_id="u",
        completion="x",
        max_delay_s=2.0,
        duplicate_rate=duplicate_rate,
    )


def test_silent_users_say_nothing() -> None:
    silent = Habits(silent=True, explicit_rate=1.0, terminal_rate=1.0, noise=0.0)
    assert _react(random.Random(0), 1.0, silent)[1] == []


def test_signals_follow_the_decision_and_the_terminal_comes_last() -> None:
    rng = random.Random(1)
    for p, terminal, explicit_sign in ((1.0, FeedbackKind.ACCEPT, 1), (0.0, FeedbackKind.REJECT, -1)):
        accepted, planned = _react(rng, p)
        assert accepted is (p == 1.0)
        kinds = [x.event.kind for x in planned]
        assert kinds.count(terminal) == 1
        last = max(planned, key=lambda x: x.delay_s)
        assert last.event.kind == terminal
        for x in planned:
            if x.event.kind == FeedbackKind.THUMB:
                assert x.event.value == explicit_sign
            if x.event.kind == FeedbackKind.RATING:
                assert (x.event.value >= 4) is (explicit_sign == 1)


def test_duplicates_reuse_the_event_id() -> None:
    rng = random.Random(2)
    _, planned = _react(rng, 1.0, duplicate_rate=1.0)
    ids = [x.event.event_id for x in planned]
    assert len(ids) == len(set(ids)) + 1


def test_acceptance_rate_matches_the_preference() -> None:
    rng = random.Random(3)
    accepted = sum(_react(rng, 0.3)[0] for _ in range(4000))
    assert 0.27 < accepted / 4000 < 0.33


def test_wilson_interval_hand_computed() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_version_stats_flag_degenerate_output() -> None:
    stats = VersionStats()
    for _ in range(10):
        stats.add("", accepted=False)
    summary = stats.summary()
    assert summary["empty_share"] == 1.0 and summary["distinct_share"] == 0.1
