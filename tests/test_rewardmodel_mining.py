"""Preference mining over seeded event sequences (pure: no broker, no model)."""

from __future__ import annotations

import random

import orjson

from schemas.codec import decode
from schemas.events import FeedbackEvent, PreferenceEvent
from services.preferences.mining import Outcome, PairState, mine_pair, mine_sequence, signals


def fb(kind: str, t: int, gid: str = "g", **kw: object) -> FeedbackEvent:
    return FeedbackEvent(
        event_id=f"f-{gid}-{kind}-{t}", event_time_ms=t, generation_id=gid, kind=kind, user_id="u", **kw
    )


def outcome(
    gid: str, completion: str, feedback: list[FeedbackEvent], t: int, user: str = "u", prompt: str = "p"
) -> Outcome:
    return Outcome(
        generation_id=gid,
        tenant_id="default",
        user_id=user,
        model="m",
        policy_version=1,
        prompt=prompt,
        completion=completion,
        generated_at_ms=t - 10,
        settled_at_ms=t,
        feedback=tuple(feedback),
    )


def kinds(mined: list) -> list[str]:
    return [m.kind for m in mined]


def test_regenerate_then_accept_prefers_the_accepted_completion() -> None:
    a = outcome("a", "long rambling answer", [fb("regenerate", 100, "a")], 100)
    b = outcome("b", "short answer", [fb("accept", 200, "b")], 200)
    mined = mine_sequence([a, b])
    assert kinds(mined) == ["regenerate_accept"]
    m = mined[0]
    assert (m.chosen, m.rejected) == ("short answer", "long rambling answer")
    assert (m.chosen_generation_id, m.rejected_generation_id, m.generation_id) == ("b", "a", "b")
    # A regenerate AFTER an accept of the same generation is not read as a preference.
    # Settle order does not matter: the accept settles first, the regenerated one by its window.
    m = mine_pair(b, a)
    assert m is not None and m.kind == "regenerate_accept" and m.chosen == "short answer"
    c = outcome("c", "x y", [fb("accept", 300, "c"), fb("regenerate", 301, "c")], 301)
    d = outcome("d", "z w", [fb("accept", 400, "d")], 400)
    assert mine_pair(c, d) is None


def test_accept_over_reject_rating_difference_and_opposite_thumbs() -> None:
    acc = outcome("a", "good", [fb("accept", 10, "a")], 10)
    rej = outcome("r", "bad", [fb("reject", 20, "r")], 20)
    m = mine_pair(acc, rej)
    assert m is not None and m.kind == "accept_reject" and m.chosen == "good"
    r5 = outcome("x", "five", [fb("rating", 10, "x", value=5)], 10)
    r2 = outcome("y", "two", [fb("rating", 20, "y", value=2)], 20)
    m = mine_pair(r5, r2)
    assert m is not None and m.kind == "rating" and m.chosen == "five" and m.margin == 0.75
    up = outcome("u1", "up", [fb("thumb", 10, "u1", value=1)], 10)
    down = outcome("d1", "down", [fb("thumb", 20, "d1", value=-1)], 20)
    m = mine_pair(down, up)
    assert m is not None and m.kind == "thumb" and (m.chosen, m.rejected) == ("up", "down")
    same = outcome("s", "five again", [fb("rating", 30, "s", value=5)], 30)
    assert mine_pair(r5, same) is None  # equal ratings order nothing


def test_edit_and_unpaired_thumbs_need_no_second_generation() -> None:
    o = outcome(
        "g", "the answer", [fb("edit", 5, edited_text="the better answer", final=True), fb("thumb", 6, value=-1)], 6
    )
    mined = mine_sequence([o])
    assert sorted(kinds(mined)) == ["edit", "unpaired"]
    edit = next(m for m in mined if m.kind == "edit")
    assert (edit.chosen, edit.rejected, edit.chosen_generation_id) == ("the better answer", "the answer", None)
    unpaired = next(m for m in mined if m.kind == "unpaired")
    assert (unpaired.chosen, unpaired.rejected) == (None, "the answer")
    # An edit that only changes whitespace is no preference.
    assert signals(outcome("h", "a  b", [fb("edit", 1, "h", edited_text="a b")], 1)).edited_text is None


def test_pairs_only_within_user_prompt_and_window_and_state_is_bounded() -> None:
    state = PairState(window_ms=1000, max_keys=2, max_per_key=2)
    a = outcome("a", "one", [fb("regenerate", 0, "a")], 0)
    other_user = outcome("b", "two", [fb("accept", 10, "b")], 10, user="v")
    other_prompt = outcome("c", "three", [fb("accept", 20, "c")], 20, prompt="q")
    assert mine_sequence([a, other_user, other_prompt], state) == []
    assert len(state.keys) == 2 and state.evicted == 1  # three keys seen, two kept
    late = outcome("d", "four", [fb("accept", 5000, "d")], 5000, user="v")
    assert mine_sequence([late], state) == []  # "b" settled more than window_ms before
    for i in range(5):
        state.observe(outcome(f"e{i}", f"t{i}", [], 6000 + i, user="w"))
    assert all(len(q) <= 2 for q in state.keys.values())


def test_seeded_sequence_gives_valid_deterministic_events() -> None:
    rng = random.Random(7)
    outcomes = []
    for i in range(400):
        gid = f"g{i}"
        kind = rng.choice(["accept", "reject", "regenerate", "thumb", "rating", "edit", "copy"])
        extra: dict[str, object] = {}
        if kind == "thumb":
            extra["value"] = rng.choice([1, -1])
        elif kind == "rating":
            extra["value"] = rng.randint(1, 5)
        elif kind == "edit":
            extra = {"edited_text": f"edited {i}", "final": True}
        outcomes.append(
            outcome(
                gid, f"completion {i}", [fb(kind, i * 10, gid, **extra)], i * 10, user=f"u{i % 5}", prompt=f"p{i % 7}"
            )
        )
    first = mine_sequence(outcomes)
    again = mine_sequence(outcomes)
    assert [m.event_id for m in first] == [m.event_id for m in again]
    assert len({m.event_id for m in first}) == len(first)
    assert {"edit", "unpaired", "accept_reject", "regenerate_accept", "rating", "thumb"} <= set(kinds(first))
    for m in first:
        event = decode(PreferenceEvent, orjson.dumps(m.to_event()))
        assert event.event_id == m.event_id
        if m.kind != "unpaired":
            assert event.chosen != event.rejected
