"""The forget filter and redaction on samples (streams/forget.py), and the delete plan
(services/privacy/forget.py), without a broker."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from schemas.codec import encode
from schemas.events import ForgetEvent, SampleEvent, forget_event_id
from services.privacy.forget import delete_statements, parameters
from services.privacy.redact import Redactor
from streams.forget import apply, owner, redact_sample
from streams.join import FB, GEN, JoinConfig, PartitionState, Record, process_batch
from tests.factories import feedback, generation


def settled(*gens) -> object:
    """The batch output of the real join for each generation plus an accept."""
    cfg = JoinConfig(mine_preferences=True)
    states = {0: PartitionState(0)}
    records = []
    for i, g in enumerate(gens):
        records.append(Record(GEN, 0, 2 * i, g.generation_id.encode(), encode(g)))
        fb = feedback(g.generation_id, kind="accept", value=None, user_id=g.user_id, event_id=f"fb-{i}")
        records.append(Record(FB, 0, 2 * i + 1, g.generation_id.encode(), encode(fb)))
    return process_batch(states, records, max(g.event_time_ms for g in gens), cfg)


def test_owner_reads_tenant_and_user_from_the_bytes() -> None:
    out = settled(generation("g1", user_id="u-1", tenant_id="acme", completion='say "user_id":"evil" ok'))
    [(_, _, value)] = out.samples
    assert owner(value) == ("acme", "u-1")
    # a value of another shape falls back to decoding it
    assert owner(orjson.dumps({"user_id": "u-2", "tenant_id": "t"}, option=orjson.OPT_INDENT_2)) == ("t", "u-2")


def test_forgotten_users_samples_are_dropped_and_counted() -> None:
    out = settled(
        generation("g1", user_id="gone", tenant_id="acme"),
        generation("g2", user_id="gone", tenant_id="globex"),  # same id, other tenant: kept
        generation("g3", user_id="stays", tenant_id="acme"),
    )
    assert out.counts["samples"] == 3 and len(out.outcomes) == 3
    apply(out, {("acme", "gone")}, None)
    kept = sorted((orjson.loads(v)["generation_id"]) for _, _, v in out.samples)
    assert kept == ["g2", "g3"]
    assert out.counts["forgotten_dropped"] == 1 and out.counts["samples"] == 2
    assert sorted(o.generation_id for _, o in out.outcomes) == ["g2", "g3"]


def test_sample_text_is_redacted_token_ids_kept() -> None:
    out = settled(
        generation("g1", prompt="mail me: ann@example.com", completion="call +1 (555) 123-4567"),
        generation("g2", completion="Nothing personal here."),
    )
    before = {orjson.loads(v)["generation_id"]: v for _, _, v in out.samples}
    apply(out, (), Redactor())
    after = {orjson.loads(v)["generation_id"]: v for _, _, v in out.samples}
    s1 = SampleEvent.model_validate_json(after["g1"])
    assert (s1.prompt, s1.completion) == ("mail me: [EMAIL]", "call [PHONE]")
    assert s1.completion_token_ids == orjson.loads(before["g1"])["completion_token_ids"]
    assert after["g2"] is before["g2"]  # untouched bytes
    assert out.counts["samples_redacted"] == 1
    # preference mining compares edits with the completion: its outcomes keep the text
    assert {o.prompt for _, o in out.outcomes} == {"mail me: ann@example.com", "Suggest a name for a cat."}


def test_redact_sample_with_custom_pattern_only() -> None:
    out = settled(generation("g1", completion="ticket TCK-77 closed"))
    [(_, _, value)] = out.samples
    r = Redactor(kinds=[], patterns={"ticket": r"TCK-\d+"})
    assert orjson.loads(redact_sample(value, r))["completion"] == "ticket [TICKET] closed"


def test_nothing_to_do_is_a_no_op() -> None:
    out = settled(generation("g1"))
    samples = list(out.samples)
    apply(out, (), None)
    assert out.samples == samples


def test_forget_event_id_is_derived() -> None:
    ev = ForgetEvent.for_user("acme", "u-1", requested_by="ticket 12")
    assert ev.event_id == forget_event_id("acme", "u-1") != forget_event_id("globex", "u-1")
    with pytest.raises(ValidationError, match="event_id"):
        ForgetEvent(tenant_id="acme", user_id="u-1")
    with pytest.raises(ValidationError, match="user_id"):
        ForgetEvent.for_user("acme", 'bad "id"')


def test_delete_plan_goes_through_generations_first() -> None:
    tables = {
        "generations": {"generation_id", "user_id", "tenant_id"},
        "feedback": {"generation_id", "user_id", "tenant_id"},
        "samples": {"generation_id", "user_id", "tenant_id"},
        "other": {"user_id", "tenant_id"},
    }
    plan = delete_statements(tables, has_dead_letters=True)
    order = [t for t, _ in plan]
    assert order == ["feedback", "samples", "feedback", "other", "samples", "generations", "dead_letters"]
    assert "generation_id IN (SELECT generation_id FROM generations" in plan[0][1]
    assert all("{tenant:String}" in w for _, w in plan)
    assert parameters("acme", "u-1")["needle"] == '"user_id":"u-1"'
