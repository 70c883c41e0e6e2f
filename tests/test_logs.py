"""services/logs.py: structured lines written, and read back by name."""

from __future__ import annotations

import logging

from services.logs import JsonFormatter, records


def test_records_reads_back_what_the_formatter_writes_and_skips_the_rest() -> None:
    rec = logging.LogRecord("rlfeed.x", logging.INFO, __file__, 1, "weights_swapped", None, None)
    rec.fields = {"version": 3, "pause_ms": 1.5}
    written = JsonFormatter().format(rec).encode()
    data = b"\n".join(
        [
            b"rlfeed stack is up",  # a banner
            written,
            b'{"event": "weights_swapped_late", "version": 9}',  # the name as a prefix only
            b"  " + written.replace(b'"version":3', b'"version":4'),
            b'{"event": "weights_swapped", "version": ',  # cut off by a kill -9
            b'{"no_event": 1}',
            b"[1, 2]",
        ]
    )
    assert [r["version"] for r in records(data, "weights_swapped")] == [3, 4]
    assert [r["event"] for r in records(data)] == ["weights_swapped", "weights_swapped_late", "weights_swapped"]
    assert records(b"", "x") == []
