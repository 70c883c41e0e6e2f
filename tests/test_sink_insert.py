"""The sink's insert format (`rows.json_columns`, JSONCompactColumns parsed by ClickHouse)
against clickhouse-connect's own column insert, through chdb: every table, every column
type, values chosen to break a text format (any unicode, control characters, NUL, quotes,
backslashes, nulls, extreme times, subnormal and negative-zero floats, Float32 rounding,
maps with odd keys), read back bit for bit the same; and the sink's insert settings
(a batch over more than 100 monthly partitions lands; one event twice in a batch reads
once with FINAL)."""

from __future__ import annotations

import math
import random
import struct
import time

import pytest

from schemas.events import MAX_TIME_MS
from services.sink.rows import INSERT_FORMAT, SPECS, TableSpec, json_columns
from tests.test_sink_poll_units import _sink

TRICKY_STRINGS = [
    "",
    "plain",
    'quote " and \\ backslash \\"',
    "nul \x00 byte, bell \x07, escape \x1b, DEL \x7f",
    "tab\tnew\nline\rcarriage",
    "é 漢字 😀 \u2028 \u2029 \ufeff \U0010ffff",
    "[1,2]",
    "null",
    '{"json": true}',
    "a" * 3000,
]
TRICKY_FLOATS = [0.0, -0.0, 5e-324, -5e-324, 1.7976931348623157e308, -1e-300, 0.1, 1 / 3, 2.5, -123456.789e10]
TRICKY_MS = [0, 1, 999, 1_000, 1_700_000_000_123, MAX_TIME_MS - 1, MAX_TIME_MS]
SAFE_INT = 2**53 - 1
NOW_MS = time.time_ns() // 1_000_000


def _value(ch_type: str, rng: random.Random) -> object:
    """A random value of a ClickHouse column type, within what the contract allows."""
    if ch_type.startswith("LowCardinality("):
        return _value(ch_type[len("LowCardinality(") : -1], rng)
    if ch_type.startswith("Nullable("):
        return None if rng.random() < 0.3 else _value(ch_type[len("Nullable(") : -1], rng)
    if ch_type == "String":
        if rng.random() < 0.5:
            return rng.choice(TRICKY_STRINGS)
        return "".join(
            chr(rng.choice([rng.randrange(0x20), rng.randrange(0x80), rng.randrange(0xD800)])) for _ in range(12)
        )
    if ch_type.startswith("DateTime64"):
        # The tables' TTLs drop old times in both inserts alike; an insert may touch at
        # most 100 monthly partitions: mostly times of the next five years.
        return rng.choice(TRICKY_MS) if rng.random() < 0.2 else rng.randrange(NOW_MS, NOW_MS + 5 * 365 * 86_400_000)
    if ch_type in ("UInt8",):
        return rng.randrange(2)
    if ch_type in ("UInt16", "UInt32"):
        return rng.randrange(2**16 if ch_type == "UInt16" else 2**31)
    if ch_type == "UInt64":
        return rng.choice([0, SAFE_INT, rng.randrange(SAFE_INT)])
    if ch_type in ("Int32", "Int64"):
        return rng.choice([-1, 0, rng.randrange(2**31 - 1)])
    if ch_type == "Float32":  # temperature, top_p: bounded by the contract
        return rng.choice([0.0, 1.0, 10.0, rng.random(), rng.random() * 10])
    if ch_type == "Float64":
        return rng.choice(TRICKY_FLOATS) if rng.random() < 0.4 else rng.uniform(-1e6, 1e6)
    if ch_type.startswith("Map("):  # Map(LowCardinality(String), <value type>)
        value_type = ch_type[len("Map(") : -1].split(", ", 1)[1]
        return {rng.choice(TRICKY_STRINGS[:7]) + str(i): _value(value_type, rng) for i in range(rng.randrange(4))}
    raise AssertionError(f"no generator for {ch_type}")


def _rows(spec: TableSpec, types: dict[str, str], n: int, seed: int) -> list[tuple]:
    rng = random.Random(seed)
    return [(f"e{seed}-{i}", *(_value(types[c], rng) for c in spec.columns[1:])) for i in range(n)]


def _bits(value: object) -> object:
    """A value with every float as its bits (so -0.0 != 0.0 and Float32 rounding shows)."""
    if isinstance(value, float):
        return ("f", struct.pack("<d", value)) if not math.isnan(value) else ("nan",)
    if isinstance(value, dict):
        return sorted((k, _bits(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(_bits(v) for v in value)
    return value


@pytest.mark.parametrize("topic", sorted(SPECS))
def test_json_columns_land_exactly_what_clickhouse_connects_column_insert_lands(clickhouse, topic: str) -> None:
    spec = SPECS[topic]
    types = {r["name"]: r["type"] for r in clickhouse.query(f"DESCRIBE TABLE {spec.table}").named_results()}
    rows = _rows(spec, types, 400, seed=len(topic))
    twin = f"{spec.table}_twin"
    clickhouse.command(f"CREATE TABLE {twin} AS {spec.table}")
    clickhouse.insert(twin, list(zip(*rows, strict=True)), column_names=spec.columns, column_oriented=True)
    clickhouse.raw_insert(spec.table, spec.columns, insert_block=json_columns(spec, rows), fmt=INSERT_FORMAT)

    for table in (spec.table, twin):  # TTLs applied now, not whenever a background merge runs
        clickhouse.command(f"OPTIMIZE TABLE {table} FINAL")
    cols = ", ".join(spec.columns)
    ours = clickhouse.query(f"SELECT {cols} FROM {spec.table} ORDER BY event_id").result_rows
    theirs = clickhouse.query(f"SELECT {cols} FROM {twin} ORDER BY event_id").result_rows
    assert len(ours) > len(rows) // 2  # the TTL drops the expired ones, from both
    assert [_bits(r) for r in ours] == [_bits(r) for r in theirs]
    # And the times are the ticks the rows held (epoch ms).
    times = ", ".join(f"toUnixTimestamp64Milli({c})" for c in spec.time_columns)
    got = clickhouse.query(f"SELECT event_id, {times} FROM {spec.table}").result_rows
    by_id = {row[0]: tuple(row[i] for i in spec.time_indexes) for row in rows}
    assert {r[0]: tuple(r[1:]) for r in got} == {r[0]: by_id[r[0]] for r in got}


def test_json_columns_are_columns_in_order_with_times_in_seconds() -> None:
    spec = SPECS["forget-requests.v1"]
    rows = [("e1", 1_700_000_000_123, "t", "u\x00", "x"), ("e2", 5, "t", "u2", "")]
    assert json_columns(spec, rows) == (b'[["e1","e2"],[1700000000.123,0.005],["t","t"],["u\\u0000","u2"],["x",""]]')
    assert json_columns(spec, []) == b"[[],[],[],[],[]]"  # a table with no rows in the batch


def test_the_sink_inserts_a_batch_spread_over_more_than_100_months(clickhouse) -> None:
    # ClickHouse refuses an insert touching over 100 partitions by default: such a batch
    # of valid events would fail forever, and the sink would retry it forever.
    sink, _ = _sink([])
    sink.client = clickhouse
    spec = SPECS["feedback.v1"]
    month_ms = 31 * 86_400_000
    rows = [(f"e{i}", NOW_MS + i * month_ms, "t", "g", "accept", None, None, 0, "u", None) for i in range(150)]
    assert sink._insert({spec.table: rows}, None)
    assert sink.stats.insert_failures == 0
    assert int(clickhouse.command(f"SELECT count() FROM {spec.table} FINAL")) == 150


def test_a_batch_holding_one_event_twice_reads_once_with_final(clickhouse) -> None:
    sink, _ = _sink([])
    sink.client = clickhouse
    spec = SPECS["forget-requests.v1"]
    rows = [("e1", NOW_MS, "t", "u1", "x"), ("e2", NOW_MS, "t", "u2", "x"), ("e1", NOW_MS, "t", "u1", "x")]
    assert sink._insert({spec.table: rows}, None)
    assert clickhouse.query(f"SELECT event_id FROM {spec.table} FINAL ORDER BY event_id").result_columns[0] == [
        "e1",
        "e2",
    ]
