"""The reward-model trainer's pure parts: buffer, held-out split, examples, publishing gate."""

from __future__ import annotations

from schemas.events import PreferenceEvent
from services.rewardmodel.data import PreferenceBuffer, is_heldout, split, to_examples
from services.rewardmodel.settings import RewardModelSettings
from services.rewardmodel.train import gate


def pref(i: int, kind: str = "edit", prompt: str | None = None, **kw: object) -> PreferenceEvent:
    texts = {"chosen": f"c{i}", "rejected": f"r{i}"} if kind != "unpaired" else kw
    return PreferenceEvent(
        event_id=f"p{i}",
        generation_id=f"g{i}",
        kind=kind,
        model="m",
        prompt=prompt or f"prompt {i}",
        user_id="u",
        **texts,
    )


def test_buffer_dedups_and_keeps_the_newest() -> None:
    buf = PreferenceBuffer(3)
    assert buf.add(pref(1)) and not buf.add(pref(1))
    for i in range(2, 6):
        buf.add(pref(i))
    assert list(buf.items) == ["p3", "p4", "p5"] and buf.duplicates == 1 and buf.added_since_train == 5


def test_split_by_prompt_and_examples() -> None:
    events = [pref(i, prompt=f"q{i % 10}") for i in range(200)]
    (tr, _), (ho, _) = split(events, 30)
    assert len(tr) + len(ho) == 200 and ho
    assert not {x.prompt for x in tr} & {x.prompt for x in ho}
    assert is_heldout("q1", 30) == is_heldout("q1", 30)
    pairs, unpaired = to_examples([pref(1), pref(2, "unpaired", rejected="bad"), pref(3, "unpaired", chosen="ok")])
    assert [p.chosen for p in pairs] == ["c1"]
    assert [(u.completion, u.desirable) for u in unpaired] == [("bad", False), ("ok", True)]


def test_publishing_gate() -> None:
    s = RewardModelSettings(rm_min_heldout_pairs=20, rm_min_heldout_auroc=0.6)
    assert gate({"heldout_pairs": 50, "heldout_auroc": 0.7}, s) == []
    assert len(gate({"heldout_pairs": 5, "heldout_auroc": 0.5}, s)) == 2
