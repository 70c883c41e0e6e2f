"""`Sink._poll` (consume and decode one batch) on fake messages: no broker, no ClickHouse."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from schemas.codec import encode
from services.kafka.idle import EndPauses
from services.sink import worker
from services.sink.rows import SPECS
from services.sink.settings import SinkSettings
from tests.factories import feedback, generation

PREFIX = "u."


class _Msg:
    def __init__(self, topic: str, value: bytes, partition: int = 0, offset: int = 0, key: bytes | None = None):
        self._topic, self._value, self._partition, self._offset, self._key = topic, value, partition, offset, key

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def value(self) -> bytes:
        return self._value

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key


class _Consumer:
    def __init__(self, batches: list[list[_Msg]]) -> None:
        self.batches = batches

    def consume(self, num_messages: int, timeout: float) -> list[_Msg]:
        return self.batches.pop(0) if self.batches else []


class _Producer:
    def __init__(self) -> None:
        self.produced: list[tuple[str, bytes, bytes | None]] = []

    def produce(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        self.produced.append((topic, value, key))


def _sink(batches: list[list[_Msg]]) -> tuple[worker.Sink, _Producer]:
    sink = worker.Sink.__new__(worker.Sink)  # no Kafka clients: the fakes stand in
    sink.settings = SinkSettings(topic_prefix=PREFIX)
    sink.prefix = PREFIX
    sink.stats = worker.SinkStats()
    sink.consumer = _Consumer(batches)
    sink.pauses = EndPauses(sink.consumer, 0)
    sink.producer = _Producer()
    sink._routes = {}
    sink._specs = {spec.table: spec for spec in SPECS.values()}
    return sink, sink.producer


def test_poll_maps_rows_keeps_the_last_offset_per_partition_and_dead_letters_bad_input() -> None:
    gens, fbs = f"{PREFIX}generations.v1", f"{PREFIX}feedback.v1"
    good = [generation(f"g-{i}") for i in range(3)]
    fb = feedback("g-0", kind="rating", value=5.0)
    bad = orjson.dumps(orjson.loads(encode(fb)) | {"value": 6})
    sink, producer = _sink(
        [
            [
                _Msg(gens, encode(good[0]), 0, 10),
                _Msg(gens, encode(good[1]), 1, 4),
                _Msg(gens, encode(good[2]), 0, 11),
                _Msg(fbs, encode(fb), 2, 7),
                _Msg(fbs, bad, 2, 8, key=b"g-0"),
            ]
        ]
    )
    batch = sink._poll()
    assert batch is not None and batch.count == 5
    assert batch.rows["generations"] == [SPECS["generations.v1"].row(e) for e in good]
    assert batch.rows["feedback"] == [SPECS["feedback.v1"].row(fb)]
    assert batch.offsets == {(gens, 0): 11, (gens, 1): 4, (fbs, 2): 8}
    assert sink.stats.slow_path == 1 and sink.stats.dead_letters == 1
    ((topic, value, key),) = producer.produced
    letter = orjson.loads(value)
    assert topic == f"{PREFIX}dlq.v1" and key == b"g-0"
    assert letter["error_field"] == "value" and letter["source_offset"] == 8 and letter["rejected_by"] == "sink"
    assert sink._poll() is None  # nothing more to read


def test_a_row_function_needing_the_pydantic_model_falls_back_to_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A row function may use what only the model has (here a method; the struct has the
    # model's fields and properties, not its methods), so the message takes the slow path
    # instead of crashing the sink.
    spec = SPECS["feedback.v1"]

    def row(e):
        return spec.row(e) if e.model_dump() is not None else ()

    monkeypatch.setitem(worker.SPECS, "feedback.v1", dataclasses.replace(spec, row=row))
    fb = feedback("g-0", kind="accept", value=None)
    sink, producer = _sink([[_Msg(f"{PREFIX}feedback.v1", encode(fb))]])
    batch = sink._poll()
    assert batch is not None and batch.rows["feedback"] == [spec.row(fb)]
    assert sink.stats.slow_path == 1 and not producer.produced


class _RecordingClient:
    """Records the raw inserts."""

    def __init__(self) -> None:
        self.inserts: list[tuple[str, object, bytes, str, dict]] = []

    def raw_insert(self, table: str, column_names, insert_block: bytes, settings: dict, fmt: str) -> None:
        self.inserts.append((table, tuple(column_names), insert_block, fmt, settings))


def test_insert_sends_one_json_document_of_columns_per_table() -> None:
    sink, _ = _sink([])
    sink.client = client = _RecordingClient()
    rows = {"forget_requests": [("e1", 1500, "t", "u1", "x"), ("e2", 2, "t", "u2", "y")]}
    assert sink._insert(rows, None)
    [(table, names, body, fmt, settings)] = client.inserts
    assert table == "forget_requests" and names == SPECS["forget-requests.v1"].columns
    assert fmt == "JSONCompactColumns" and settings["max_partitions_per_insert_block"] == 0
    # times go as epoch seconds (ClickHouse reads a JSON number into DateTime64(3) so)
    assert orjson.loads(body) == [["e1", "e2"], [1.5, 0.002], ["t", "t"], ["u1", "u2"], ["x", "y"]]
    assert sink.stats.rows["forget_requests"] == 2
