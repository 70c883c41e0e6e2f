"""Redaction through the real parts: an email or phone number in a generation, an edit or
a rejected message never lands in ClickHouse (real sink into chdb) nor leaves the stream
worker (subprocess on the real broker) on samples.v1."""

from __future__ import annotations

import uuid

import orjson
import pytest

from schemas.topics import SAMPLES
from services.sink.settings import SinkSettings
from services.sink.worker import Sink
from tests.test_forget_integration import until
from tests.test_streams_worker import SCENARIO_ENV, Worker, produce, reader_for
from tests.test_streams_worker import fb as feedback_event
from tests.test_streams_worker import gen as generation_event

pytestmark = pytest.mark.timeout(180)

EMAIL, PHONE = "jane.roe@example.com", "+1 (555) 123-4567"


def test_pii_never_reaches_clickhouse_or_samples(kafka_bootstrap: str, topic_prefix: str, clickhouse, tmp_path) -> None:
    prefix = topic_prefix
    worker = Worker(kafka_bootstrap, prefix, f"g-{uuid.uuid4().hex[:8]}", tmp_path / "w.log", **SCENARIO_ENV)
    reader = reader_for(kafka_bootstrap, prefix)
    sink = Sink(
        SinkSettings(topic_prefix=prefix, sink_group_id=f"s-{uuid.uuid4().hex[:8]}"), kafka_bootstrap, clickhouse
    )
    try:
        worker.wait_log("streams.assigned", lambda r: len(r["partitions"]) == 8)
        gen = generation_event("g-pii").model_copy(
            update={"prompt": f"my phone is {PHONE}", "completion": f"Write to {EMAIL} today."}
        )
        bad = orjson.dumps(
            {"generation_id": "g-pii", "kind": "rating", "value": 9, "user_id": "u", "session_id": EMAIL}
        )
        produce(
            kafka_bootstrap,
            prefix,
            [
                gen,
                feedback_event("f-edit", "g-pii", "edit", edited_text=f"Mail {EMAIL}"),
                feedback_event("f-acc", "g-pii", "accept"),
            ],
            raw=[("feedback.v1", b"g-pii", bad)],
        )
        reader.wait(lambda: len(reader.messages[SAMPLES.full_name(prefix)]) >= 1, what="the sample")
        sample = orjson.loads(reader.messages[SAMPLES.full_name(prefix)][0].value())
        assert sample["prompt"] == "my phone is [PHONE]" and sample["completion"] == "Write to [EMAIL] today."
        assert sample["completion_token_ids"] == gen.completion_token_ids

        def landed() -> bool:
            counts = clickhouse.query(
                """SELECT (SELECT count() FROM generations WHERE generation_id = 'g-pii'),
                          (SELECT count() FROM feedback WHERE generation_id = 'g-pii'),
                          (SELECT count() FROM dead_letters WHERE position(tryBase64Decode(original_b64), 'g-pii') > 0),
                          (SELECT count() FROM samples WHERE generation_id = 'g-pii')"""
            ).result_rows[0]
            # the bad rating is dead-lettered by the sink and by the worker: two letters
            return counts == (1, 2, 2, 1)

        until(landed, "every row in ClickHouse", sink.run_once)
        leaks = clickhouse.query(
            """SELECT 'generations', count() FROM generations WHERE position(concat(prompt, completion), {e:String}) > 0
                   OR position(prompt, '555') > 0
               UNION ALL SELECT 'feedback', count() FROM feedback
                   WHERE position(ifNull(edited_text, ''), {e:String}) > 0
               UNION ALL SELECT 'dead_letters', count() FROM dead_letters
                   WHERE position(tryBase64Decode(original_b64), {e:String}) > 0 OR position(reason, {e:String}) > 0""",
            parameters={"e": EMAIL},
        ).result_rows
        assert dict(leaks) == {"generations": 0, "feedback": 0, "dead_letters": 0}
        row = clickhouse.query("SELECT prompt, completion FROM generations WHERE generation_id = 'g-pii'").result_rows
        assert row == [("my phone is [PHONE]", "Write to [EMAIL] today.")]
        edit = clickhouse.query("SELECT edited_text FROM feedback WHERE kind = 'edit'").result_rows
        assert edit == [("Mail [EMAIL]",)]
        letters = clickhouse.query(
            "SELECT tryBase64Decode(original_b64) AS raw FROM dead_letters WHERE position(raw, 'g-pii') > 0"
        ).result_rows
        assert all(b'"session_id":"[EMAIL]"' in (v.encode() if isinstance(v, str) else v) for (v,) in letters)
    finally:
        sink.close()
        reader.close()
        worker.stop()
