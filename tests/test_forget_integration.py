"""`rlfeed forget` through the real parts: a stream worker subprocess on the real broker,
the real sink into chdb (or RLFEED_CLICKHOUSE_URL), and the command itself.

A forgotten user's rows leave every ClickHouse table; a later feedback of theirs (and a
correction of a sample settled before) yields no sample, while another user's does.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from urllib.parse import urlsplit

import orjson
import pytest

from schemas.topics import SAMPLES
from services.privacy.command import forget_cli
from services.sink.settings import SinkSettings
from services.sink.worker import Sink
from tests.test_streams_worker import SCENARIO_ENV, Worker, produce, reader_for
from tests.test_streams_worker import fb as feedback_event
from tests.test_streams_worker import gen as generation_event

pytestmark = pytest.mark.timeout(180)
WAIT_S = 60.0


def until(pred: Callable[[], bool], what: str, step: Callable[[], object] = lambda: None) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        step()
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def gen_of(gid: str, user: str):
    return generation_event(gid).model_copy(update={"user_id": user, "completion": f"answer for {user}"})


def database_url(clickhouse_url: str, database: str) -> str:
    if clickhouse_url.startswith("chdb:"):
        return f"{clickhouse_url}?database={database}"
    return urlsplit(clickhouse_url)._replace(path=f"/{database}").geturl()


def rows_of(client, table: str, user: str) -> int:
    return int(
        client.query(f"SELECT count() FROM {table} WHERE user_id = {{u:String}}", parameters={"u": user}).result_rows[
            0
        ][0]
    )


def test_forget_deletes_rows_and_stops_training(
    kafka_bootstrap: str, topic_prefix: str, clickhouse, clickhouse_url: str, tmp_path, monkeypatch
) -> None:
    prefix, gone, kept = topic_prefix, f"gone-{uuid.uuid4().hex[:6]}", f"kept-{uuid.uuid4().hex[:6]}"
    worker = Worker(
        kafka_bootstrap,
        prefix,
        f"g-{uuid.uuid4().hex[:8]}",
        tmp_path / "w.log",
        **SCENARIO_ENV,
        RLFEED_STATUS_INTERVAL_S="0.3",
        RLFEED_FORGET_REFRESH_S="1",  # the request of step 3 is issued while the worker runs
    )
    reader = reader_for(kafka_bootstrap, prefix)
    sink = Sink(
        SinkSettings(topic_prefix=prefix, sink_group_id=f"s-{uuid.uuid4().hex[:8]}"), kafka_bootstrap, clickhouse
    )
    try:
        worker.wait_log("streams.forget_loaded")
        worker.wait_log("streams.assigned", lambda r: len(r["partitions"]) == 8)

        def samples_of(user: str) -> list[dict]:
            out = [orjson.loads(m.value()) for m in reader.messages[SAMPLES.full_name(prefix)]]
            return [s for s in out if s["user_id"] == user]

        # 1. both users get a sample, and everything reaches ClickHouse
        produce(
            kafka_bootstrap,
            prefix,
            [
                gen_of("g-gone-1", gone),
                gen_of("g-kept-1", kept),
                feedback_event("f-gone-1", "g-gone-1", "thumb", value=1.0),
                feedback_event("f-kept-1", "g-kept-1", "accept"),
            ],
        )
        reader.wait(lambda: samples_of(gone) and samples_of(kept), what="the first samples")
        until(
            lambda: rows_of(clickhouse, "samples", gone) == 1 and rows_of(clickhouse, "samples", kept) == 1,
            "samples in ClickHouse",
            sink.run_once,
        )
        assert rows_of(clickhouse, "generations", gone) == 1 and rows_of(clickhouse, "feedback", "u") >= 2

        # 2. forget (the command, against this database)
        monkeypatch.setenv("RLFEED_KAFKA_URL", f"kafka://{kafka_bootstrap}")
        monkeypatch.setenv("RLFEED_TOPIC_PREFIX", prefix)
        monkeypatch.setenv("RLFEED_CLICKHOUSE_URL", database_url(clickhouse_url, clickhouse.database))
        assert forget_cli(gone, "default", "integration test") == 0
        for table in ("generations", "samples"):
            assert rows_of(clickhouse, table, gone) == 0, table
            assert rows_of(clickhouse, table, kept) == 1, table
        # feedback carries the app's user id ("u" here): it goes with the user's generations
        linked = clickhouse.query("SELECT count() FROM feedback WHERE generation_id = 'g-gone-1'").result_rows[0][0]
        assert linked == 0
        assert clickhouse.query("SELECT count() FROM feedback WHERE generation_id = 'g-kept-1'").result_rows[0][0] == 1

        # 3. the worker has the forget request; a later feedback of the user yields no sample
        worker.wait_log("streams.user_forgotten")
        produce(
            kafka_bootstrap,
            prefix,
            [
                gen_of("g-gone-2", gone),
                gen_of("g-kept-2", kept),
                feedback_event("f-gone-2", "g-gone-2", "accept"),
                feedback_event("f-kept-2", "g-kept-2", "accept"),
                feedback_event("f-gone-3", "g-gone-1", "accept"),  # corrects the sample settled before
            ],
        )
        reader.wait(lambda: any(s["generation_id"] == "g-kept-2" for s in samples_of(kept)), what="kept-2's sample")
        worker.wait_log("streams.status", lambda r: r.get("join", {}).get("forgotten_dropped", 0) >= 2)
        reader.poll()
        assert [s["generation_id"] for s in samples_of(gone)] == ["g-gone-1"]  # only the one from before

        # 4. the audit row, and a second run removes what the sink copied since
        stop = threading.Event()
        until(
            lambda: rows_of(clickhouse, "forget_requests", gone) == 1 and rows_of(clickhouse, "generations", gone) == 1,
            "the audit row and the late generation",
            lambda: sink.run_once(stop),
        )
        assert forget_cli(gone, "default", "again") == 0
        assert rows_of(clickhouse, "generations", gone) == 0
        assert rows_of(clickhouse, "forget_requests", gone) == 1
    finally:
        sink.close()
        reader.close()
        worker.stop()


def test_forget_goes_through_the_stacks_dashboard_when_it_owns_clickhouse(
    clickhouse, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the embedded stack running (it owns chdb), the command asks its dashboard."""
    from services.apikeys import KeyStore, create_key
    from services.dashboard.monitor import Monitor
    from services.dashboard.panels import Store
    from services.dashboard.server import DashboardServer, build_app
    from services.dashboard.settings import DashboardSettings
    from services.privacy import command
    from services.sink.rows import SPECS
    from services.stack import state
    from tests.factories import generation

    spec = SPECS["generations.v1"]
    rows = [spec.row(generation(f"g{i}", user_id=("gone" if i < 2 else "kept"))) for i in range(3)]
    clickhouse.insert(spec.table, list(zip(*rows, strict=True)), column_names=spec.columns, column_oriented=True)
    keys_file = tmp_path / "keys.json"
    operator, tenant = create_key(keys_file, "operator"), create_key(keys_file, "acme")
    settings = DashboardSettings(dashboard_port=0)
    store = Store(clickhouse)
    server = DashboardServer(
        build_app(store, Monitor(store, settings), settings, KeyStore(keys_file)), "127.0.0.1", 0
    ).start()
    try:
        monkeypatch.delenv("RLFEED_CLICKHOUSE_URL", raising=False)
        monkeypatch.setattr(state, "read", lambda home: {"dashboard_url": server.url})
        monkeypatch.setenv("RLFEED_FORGET_OPERATOR_KEY", tenant)
        with pytest.raises(RuntimeError, match="403"):
            command.delete_rows(command.ForgetSettings(), "default", "gone")
        monkeypatch.setenv("RLFEED_FORGET_OPERATOR_KEY", operator)
        assert command.delete_rows(command.ForgetSettings(), "default", "gone")["generations"] == 2
        left = clickhouse.query("SELECT user_id FROM generations").result_rows
        assert left == [("kept",)]
    finally:
        server.stop()


def _request(bootstrap: str, prefix: str, *pairs: tuple[str, str], raw: bytes | None = None) -> None:
    from confluent_kafka import Producer

    from schemas.codec import encode
    from schemas.events import ForgetEvent
    from schemas.topics import FORGET_REQUESTS

    producer = Producer({"bootstrap.servers": bootstrap})
    topic = FORGET_REQUESTS.full_name(prefix)
    for tenant, user in pairs:
        ev = ForgetEvent.for_user(tenant, user)
        producer.produce(topic, key=f"{tenant}/{user}".encode(), value=encode(ev))
    if raw is not None:
        producer.produce(topic, key=b"bad", value=raw)
    assert producer.flush(30) == 0


def test_forget_follower_loads_at_start_and_catches_up_periodically(kafka_bootstrap: str, topic_prefix: str) -> None:
    from services.privacy.settings import PrivacySettings
    from streams.forget import ForgetFollower

    settings = PrivacySettings(topic_prefix=topic_prefix)
    _request(kafka_bootstrap, topic_prefix, ("acme", "u-1"), ("default", "u-2"), raw=b"{not json")
    follower = ForgetFollower(kafka_bootstrap, settings, refresh_s=0.2).start(30.0)
    try:
        # the whole topic is read before start() returns: the worker joins nothing before
        assert follower.pairs == {("acme", "u-1"), ("default", "u-2")} and follower.bad_records == 1
        assert sum(follower.offsets.values()) == 3
        # a request issued while it runs takes effect at the next catch-up
        _request(kafka_bootstrap, topic_prefix, ("acme", "u-3"))
        until(lambda: ("acme", "u-3") in follower.pairs, "the catch-up to read the new request")
        # each catch-up reads from the last offset seen: nothing is read twice
        done = follower.catch_ups
        until(lambda: follower.catch_ups >= done + 2, "two more catch-ups")
        assert follower.bad_records == 1 and sum(follower.offsets.values()) == 4
    finally:
        follower.stop()
    assert not follower._thread.is_alive()


def test_forget_follower_on_a_missing_topic_starts_and_finds_it_later(kafka_bootstrap: str) -> None:
    from services.kafka.topics import ensure_topics
    from services.privacy.settings import PrivacySettings
    from streams.forget import ForgetFollower

    prefix = f"t{uuid.uuid4().hex[:10]}."
    follower = ForgetFollower(kafka_bootstrap, PrivacySettings(topic_prefix=prefix), refresh_s=0.2).start(5.0)
    try:
        assert follower.pairs == set()
        ensure_topics(kafka_bootstrap, prefix)
        _request(kafka_bootstrap, prefix, ("acme", "late"))
        until(lambda: ("acme", "late") in follower.pairs, "the topic created later to be read")
    finally:
        follower.stop()
