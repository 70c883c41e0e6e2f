"""Unit tests of the pure join, the rewards and the changelog codec (no broker)."""

from __future__ import annotations

import base64
import math

import orjson
import pytest

from schemas.codec import encode
from schemas.events import FeedbackEvent, GenerationEvent, SampleEvent
from streams import rewards
from streams.changelog import restore
from streams.join import FB, GEN, JoinConfig, PartitionState, Record, process_batch, sample_id
from streams.rewards import RewardInput, RewardParams, composite, edit_similarity_of
from streams.settings import StreamsSettings

T0 = 1_700_000_000_000
WALL = T0  # wall clock equal to the event clock: no idle advance unless a test moves it
WEIGHTS = StreamsSettings().reward_weights
CFG = JoinConfig(settle_window_ms=10_000, generation_ttl_ms=60_000, orphan_feedback_ttl_ms=30_000, weights=WEIGHTS)


def gen(
    gid: str = "g1", t: int = T0, user: str = "u1", completion: str = "the quick brown fox", **kw
) -> GenerationEvent:
    return GenerationEvent(
        event_id=f"ev-{gid}",
        event_time_ms=t,
        generation_id=gid,
        model="m",
        policy_version=7,
        prompt="p",
        completion=completion,
        prompt_token_ids=[1, 2],
        completion_token_ids=[3, 4, 5],
        completion_logprobs=[-0.1, -0.2, -0.3],
        user_id=user,
        **kw,
    )


def fb(eid: str, kind: str, gid: str = "g1", t: int = T0 + 1000, **kw) -> FeedbackEvent:
    return FeedbackEvent(event_id=eid, event_time_ms=t, generation_id=gid, kind=kind, user_id="u1", **kw)


def rec(event: GenerationEvent | FeedbackEvent, offset: int = 0, partition: int = 0) -> Record:
    source = GEN if isinstance(event, GenerationEvent) else FB
    return Record(source, partition, offset, event.generation_id.encode(), encode(event))


def run(states: dict[int, PartitionState], events: list, wall: int = WALL, cfg: JoinConfig = CFG):
    out = process_batch(states, [rec(e, i) for i, e in enumerate(events)], wall, cfg)
    return out, [orjson.loads(v) for _, _, v in out.samples]


def fresh() -> dict[int, PartitionState]:
    return {0: PartitionState(0)}


# --- rewards, hand-computed ---


def test_explicit_rewards_are_normalised() -> None:
    params = RewardParams()
    inp = RewardInput("x", [fb("a", "thumb", value=-1), fb("b", "rating", value=4)], "window", params)
    assert rewards.components(inp) == {"thumb": -1.0, "rating": 0.5}
    assert rewards.rating(RewardInput("x", [fb("a", "rating", value=1)], "window", params)) == -1.0
    assert rewards.rating(RewardInput("x", [fb("a", "rating", value=5)], "window", params)) == 1.0


def test_latest_accept_or_reject_wins_and_implicit_defaults() -> None:
    params = RewardParams()
    inp = RewardInput("x", [fb("a", "reject", t=T0 + 5), fb("b", "accept", t=T0 + 9)], "terminal", params)
    assert rewards.components(inp) == {"accept": 0.75}
    inp = RewardInput("x", [fb("a", "accept", t=T0 + 9), fb("b", "reject", t=T0 + 5)], "terminal", params)
    assert rewards.components(inp) == {"accept": 0.75}
    assert rewards.components(RewardInput("x", [fb("a", "reject")], "terminal", params)) == {"reject": -0.25}


def test_edit_similarity_copy_regenerate_dwell() -> None:
    # 4 words vs 4 words sharing 3 in order: ratio = 2*3/8 = 0.75
    assert edit_similarity_of("the quick brown fox", "the quick red fox", 1000) == 0.75
    assert edit_similarity_of("", "", 1000) == 1.0
    params = RewardParams(dwell_saturation_s=20.0)
    inp = RewardInput(
        "the quick brown fox",
        [
            fb("a", "edit", edited_text="the quick red fox", final=True),
            fb("b", "copy"),
            fb("c", "regenerate"),
            fb("d", "dwell", value=5),
            fb("e", "dwell", value=30),
        ],
        "terminal",
        params,
    )
    assert rewards.components(inp) == {"edit_similarity": 0.75, "copy": 0.5, "regenerate": -0.5, "dwell": 1.0}


def test_composite_weights_and_clip() -> None:
    assert composite({"thumb": 1.0, "dwell": 0.5}, {"thumb": 2.0, "dwell": 0.25}, 10.0) == 2.125
    assert composite({"thumb": 1.0, "other": 5.0}, {"thumb": 1.0}, 10.0) == 1.0
    assert composite({"thumb": 1.0}, {"thumb": 50.0}, 10.0) == 10.0


def test_weights_from_env_and_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("RLFEED_REWARD_WEIGHTS", '{"thumb": 3.0}')
    assert StreamsSettings().reward_weights == {"thumb": 3.0}
    path = tmp_path / "w.json"
    path.write_text('{"dwell": 0.5}')
    monkeypatch.setenv("RLFEED_REWARD_WEIGHTS_FILE", str(path))
    assert StreamsSettings().reward_weights == {"thumb": 3.0, "dwell": 0.5}
    monkeypatch.setenv("RLFEED_REWARD_WEIGHTS", '{"nonsense": 1}')
    with pytest.raises(ValueError, match="unknown components"):
        StreamsSettings()


# --- join ---


def test_terminal_settles_with_all_trainer_fields() -> None:
    states = fresh()
    _out, samples = run(states, [gen(), fb("f1", "thumb", value=1), fb("f2", "accept", t=T0 + 2000)])
    assert len(samples) == 1
    s = samples[0]
    SampleEvent.model_validate(s)
    assert s["settle_reason"] == "terminal"
    assert s["reward_components"] == {"thumb": 1.0, "accept": 0.75}
    assert s["reward"] == 1.75
    assert s["feedback_event_ids"] == ["f1", "f2"]
    assert s["event_id"] == sample_id("g1", "terminal", ["f2", "f1"])
    assert s["event_time_ms"] == T0 + 2000
    assert (s["prompt_token_ids"], s["completion_token_ids"], s["completion_logprobs"]) == (
        [1, 2],
        [3, 4, 5],
        [-0.1, -0.2, -0.3],
    )
    assert s["policy_version"] == 7 and s["generated_at_ms"] == T0
    assert "g1" in states[0].settled and not states[0].pending


def test_feedback_before_generation_is_buffered() -> None:
    states = fresh()
    _, samples = run(states, [fb("f1", "reject")])
    assert samples == [] and "g1" in states[0].pending
    _out, samples = run(states, [gen()])
    assert [s["settle_reason"] for s in samples] == ["terminal"]
    assert samples[0]["reward_components"] == {"reject": -0.25}


def test_duplicates_are_dropped_by_event_id() -> None:
    states = fresh()
    out, samples = run(states, [gen(), gen(), fb("f1", "thumb", value=-1), fb("f1", "thumb", value=-1)])
    assert out.counts["duplicates"] == 2 and samples == []
    out, samples = run(states, [fb("f1", "thumb", value=-1)], wall=WALL + 20_000)
    assert out.counts["duplicates"] == 1
    assert [s["settle_reason"] for s in samples] == ["window"]
    assert samples[0]["feedback_event_ids"] == ["f1"]
    # duplicate after settling: still a duplicate, no correction
    out, samples = run(states, [fb("f1", "thumb", value=-1)], wall=WALL + 20_000)
    assert samples == [] and out.counts["duplicates"] == 1


def test_window_settles_on_event_time_then_on_wall_tick() -> None:
    states = fresh()
    run(states, [gen(), fb("f1", "thumb", value=1, t=T0 + 1000)])
    # another key's event moves the event clock past first feedback + 10 s
    out, samples = run(states, [gen("g2", t=T0 + 11_000)])
    assert [(s["generation_id"], s["settle_reason"], s["event_time_ms"]) for s in samples] == [
        ("g1", "window", T0 + 11_000)
    ]
    # no more events: the wall clock moves g2's TTL along
    out, samples = run(states, [], wall=WALL + 59_000)
    assert out.counts["expired_dropped"] == 0
    out, samples = run(states, [], wall=WALL + 61_000)
    assert out.counts["expired_dropped"] == 1 and samples == []


def test_ttl_implicit_reward_and_correction_after_settling() -> None:
    cfg = JoinConfig(generation_ttl_ms=60_000, weights=WEIGHTS, params=RewardParams(ttl_implicit_reward=-0.1))
    states = fresh()
    run(states, [gen()], cfg=cfg)
    _, samples = run(states, [], wall=WALL + 60_000, cfg=cfg)
    assert [(s["settle_reason"], s["reward"], s["reward_components"]) for s in samples] == [
        ("ttl", -0.1, {"ttl_implicit": -0.1})
    ]
    first_id = samples[0]["event_id"]
    _, samples = run(states, [fb("late", "thumb", value=1, t=T0 + 61_000)], wall=WALL + 61_000, cfg=cfg)
    assert len(samples) == 1
    s = samples[0]
    assert s["settle_reason"] == "correction" and s["corrects_event_id"] == first_id
    assert s["reward_components"] == {"thumb": 1.0} and s["feedback_event_ids"] == ["late"]
    # a second late feedback corrects the correction
    _out, samples = run(states, [fb("late2", "copy", t=T0 + 62_000)], wall=WALL + 62_000, cfg=cfg)
    assert samples[0]["corrects_event_id"] == s["event_id"]
    assert samples[0]["reward"] == 1.5


def test_dropped_generation_reopens_on_late_feedback() -> None:
    states = fresh()
    run(states, [gen()])
    out, _ = run(states, [], wall=WALL + 60_000)
    assert out.counts["expired_dropped"] == 1
    out, samples = run(states, [fb("late", "accept", t=T0 + 70_000)], wall=WALL + 70_000)
    assert out.counts["reopened"] == 1
    assert [(s["settle_reason"], s["reward"]) for s in samples] == [("terminal", 0.75)]


def test_orphan_feedback_is_dead_lettered_after_its_ttl() -> None:
    states = fresh()
    run(states, [fb("f1", "thumb", gid="nobody", value=1, t=T0)])
    out, samples = run(states, [], wall=WALL + 30_000)
    assert samples == [] and out.counts["orphans_expired"] == 1
    ((key, value),) = out.dead_letters
    dl = orjson.loads(value)
    assert key == b"nobody" and "orphan feedback" in dl["reason"]
    assert FeedbackEvent.model_validate_json(base64.b64decode(dl["original_b64"])).event_id == "f1"
    assert out.changelog[0] == (0, b"nobody", None)


@pytest.mark.parametrize(
    ("source", "value", "reason"),
    [
        (FB, b"{not json", "invalid JSON"),
        (FB, b"[1, 2]", "expected a JSON object"),
        (FB, encode(fb("x", "thumb", value=1)).replace(b'"thumb"', b'"smile"'), "kind"),
        (FB, encode(fb("x", "rating", value=3)).replace(b"3.0", b"9e9"), "rating"),
        (GEN, b'{"a": "' + b"x" * 1_100_000 + b'"}', "exceeds"),
        (GEN, encode(gen()).replace(b"[-0.1,-0.2,-0.3]", b"[-0.1]"), "completion_logprobs"),
        (GEN, None, "empty message value"),
    ],
)
def test_bad_input_is_dead_lettered_with_original_bytes(source: int, value: bytes | None, reason: str) -> None:
    states = fresh()
    out = process_batch(states, [Record(source, 0, 42, b"g1", value)], WALL, CFG)
    assert out.samples == [] and len(out.dead_letters) == 1
    dl = orjson.loads(out.dead_letters[0][1])
    assert reason in dl["reason"] or reason == dl.get("error_field")
    kept = base64.b64decode(dl["original_b64"])
    assert kept == (value or b"") or (len(value or b"") > CFG.max_dead_letter_bytes and value.startswith(kept))
    assert (dl["source_offset"], dl["source_partition"], dl["rejected_by"]) == (42, 0, "streams")


def test_huge_dead_letter_is_cut_to_fit() -> None:
    cfg = JoinConfig(max_dead_letter_bytes=100_000)
    raw = b"[" * 200_000
    out = process_batch(fresh(), [Record(GEN, 0, 1, b"k", raw)], WALL, cfg)
    ((key, value),) = out.dead_letters
    assert len(value) <= 100_000 and key == b"k"
    dl = orjson.loads(value)
    kept = base64.b64decode(dl["original_b64"])
    assert raw.startswith(kept) and len(kept) == 100_000 * 3 // 4 - 8192 and "truncated" in dl["reason"]


def test_key_mismatch_and_future_clock_are_dead_lettered() -> None:
    states = fresh()
    bad_key = Record(FB, 0, 1, b"other", encode(fb("x", "copy")))
    future = Record(FB, 0, 2, b"g1", encode(fb("y", "copy", t=WALL + 3_600_000)))
    out = process_batch(states, [bad_key, future], WALL, CFG)
    reasons = [orjson.loads(v)["reason"] for _, v in out.dead_letters]
    assert len(reasons) == 2 and "not the generation_id" in reasons[0] and "max_clock_skew_s" in reasons[1]
    assert states[0].max_event_ms == 0


def test_bounds_evict_oldest_and_cap_feedback() -> None:
    cfg = JoinConfig(max_pending=2, max_settled=1, max_feedback=2, weights=WEIGHTS)
    states = fresh()
    out, samples = run(states, [gen("a"), gen("b"), fb("f1", "thumb", gid="a", value=1), gen("c")], cfg=cfg)
    # three pending > 2: the oldest ("a", with feedback) settles early by window
    assert [(s["generation_id"], s["settle_reason"]) for s in samples] == [("a", "window")]
    assert list(states[0].pending) == ["b", "c"] and list(states[0].settled) == ["a"]
    out, _ = run(states, [fb("f2", "copy", gid="b"), fb("f3", "copy", gid="b"), fb("f4", "copy", gid="b")], cfg=cfg)
    assert len(out.dead_letters) == 1 and "more than 2 feedback" in orjson.loads(out.dead_letters[0][1])["reason"]


def test_user_cap_per_window() -> None:
    cfg = JoinConfig(user_cap_per_partition=2, user_cap_window_ms=3_600_000, weights=WEIGHTS)
    states = fresh()
    events = []
    for i in range(3):
        events += [gen(f"g{i}"), fb(f"f{i}", "accept", gid=f"g{i}")]
    out, samples = run(states, events, cfg=cfg)
    assert len(samples) == 2 and out.counts["capped"] == 1
    assert (
        math.ceil(5 / 8)
        == JoinConfig.from_settings(StreamsSettings(user_cap_samples_per_window=5), 8).user_cap_per_partition
    )


def test_changelog_restores_the_same_state_and_replay_gives_same_ids() -> None:
    states = fresh()
    changelog = []
    batches = [
        [gen("g1"), fb("f1", "thumb", value=1), gen("g2"), fb("o1", "copy", gid="g3")],
        [fb("f2", "accept", gid="g2", t=T0 + 3000)],
    ]
    all_samples = []
    for batch in batches:
        out, samples = run(states, batch)
        changelog += [(k, v) for _, k, v in out.changelog]
        all_samples += samples
    restored = restore(0, changelog, CFG, WALL)
    assert list(restored.pending) == list(states[0].pending) == ["g1", "g3"]
    assert list(restored.settled) == ["g2"]
    assert restored.pending["g1"].fb_ids == {"f1"} and restored.max_event_ms == states[0].max_event_ms
    assert restored.settled["g2"].sample_id == all_samples[0]["event_id"]
    # replaying the last batch over the restored state: a duplicate, nothing new
    out, samples = run({0: restored}, batches[1])
    assert samples == [] and out.counts["duplicates"] == 1
    # replaying everything over an empty state gives the same sample ids
    replay = fresh()
    ids = [s["event_id"] for batch in batches for s in run(replay, batch)[1]]
    assert ids == [s["event_id"] for s in all_samples]


def test_lax_input_joins_through_the_pydantic_verdict_and_restores() -> None:
    """Input only pydantic's lax mode accepts (a numeric string, an integral float) is
    joined like any other; its changelog entry restores."""
    states = fresh()
    raw_gen = encode(gen()).replace(b'"policy_version":7', b'"policy_version":7.0')
    raw_fb = orjson.dumps(
        {
            "event_id": "f1",
            "event_time_ms": T0 + 1000,
            "generation_id": "g1",
            "kind": "rating",
            "value": "5",
            "user_id": "u1",
        }
    )
    out = process_batch(states, [Record(GEN, 0, 0, b"g1", raw_gen), Record(FB, 0, 1, b"g1", raw_fb)], WALL, CFG)
    assert out.dead_letters == [] and states[0].pending["g1"].fb_ids == {"f1"}
    restored = restore(0, [(k, v) for _, k, v in out.changelog], CFG, WALL)
    assert restored.pending["g1"].gen.policy_version == 7 and restored.pending["g1"].fbs[0].value == 5.0
    _, samples = run(states, [], wall=WALL + 20_000)
    assert [(s["policy_version"], s["reward_components"]) for s in samples] == [(7, {"rating": 1.0})]


def test_fast_and_pydantic_decoded_events_give_the_same_sample() -> None:
    """The same events, once through the fast path and once as lax-but-equal input that
    only pydantic accepts, produce byte-identical samples."""
    events = [gen(), fb("f1", "thumb", value=1), fb("f2", "accept", t=T0 + 2000)]
    fast_out = process_batch(fresh(), [rec(e, i) for i, e in enumerate(events)], WALL, CFG)
    lax = [
        Record(r.source, 0, r.offset, r.key, r.value.replace(b'"schema_version":1', b'"schema_version":1.0'))
        for r in (rec(e, i) for i, e in enumerate(events))
    ]
    slow_out = process_batch(fresh(), lax, WALL, CFG)
    assert slow_out.dead_letters == [] and len(fast_out.samples) == 1
    assert slow_out.samples == fast_out.samples


@pytest.mark.parametrize("big", [2**53, 2**63, 2**64 - 1, 2**64, 10**30])
def test_policy_version_beyond_json_safe_ints_is_dead_lettered_not_a_crash(big: int) -> None:
    """orjson cannot encode ints >= 2**64 (and doubles lose ints >= 2**53): a hostile
    policy_version must be dead-lettered at decode, never reach the sample's orjson.dumps."""
    events = [gen(), fb("f1", "accept")]
    raws = [encode(e) for e in events]
    raws[0] = raws[0].replace(b'"policy_version":7', b'"policy_version":' + str(big).encode())
    assert str(big).encode() in raws[0]
    records = [Record(GEN, 0, 0, b"g1", raws[0]), Record(FB, 0, 1, b"g1", raws[1])]
    out = process_batch(fresh(), records, WALL + 60_000, CFG)
    assert out.samples == []
    dls = [orjson.loads(v) for _, v in out.dead_letters]
    assert dls[0]["error_field"] == "policy_version" and dls[0]["source_offset"] == 0
    assert base64.b64decode(dls[0]["original_b64"]) == raws[0]
    # the largest JSON-safe version still joins
    ok = raws[0].replace(str(big).encode(), str(2**53 - 1).encode())
    out = process_batch(fresh(), [Record(GEN, 0, 0, b"g1", ok), records[1]], WALL, CFG)
    assert [orjson.loads(v)["policy_version"] for _, _, v in out.samples] == [2**53 - 1]


def test_token_arrays_are_carried_into_the_sample_as_sent() -> None:
    """The generation's arrays reach the sample as their original JSON text (no list per
    token on the fast path): any valid spelling gives the same values, the sample is a
    valid SampleEvent, and a generation restored from the changelog gives the same bytes."""
    raw_gen = encode(gen()).replace(b"[-0.1,-0.2,-0.3]", b"[ -0.1, -2e-1,-0.30 ]").replace(b"[1,2]", b"[1 ,2]")
    events = [Record(GEN, 0, 0, b"g1", raw_gen), rec(fb("f1", "thumb", value=1), 1)]
    states = fresh()
    out = process_batch(states, events, WALL, CFG)
    restored = {0: restore(0, [(k, v) for _, k, v in out.changelog], CFG, WALL)}
    _, samples = run(states, [fb("f2", "accept", t=T0 + 2000)])
    _, again = run(restored, [fb("f2", "accept", t=T0 + 2000)])
    assert len(samples) == 1 and samples == again
    s = samples[0]
    assert (s["prompt_token_ids"], s["completion_token_ids"], s["completion_logprobs"]) == (
        [1, 2],
        [3, 4, 5],
        [-0.1, -0.2, -0.3],
    )
    SampleEvent.model_validate(s)
