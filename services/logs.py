"""Structured logs: one JSON object per line on stderr.

Use `log = get_logger(__name__)` and `log.info("event_name", extra={"fields": {...}})`,
or the shorthand `event(log, "event_name", key=value)`.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson


class JsonFormatter(logging.Formatter):
    """Formats a record as `{"ts": ..., "level": ..., "logger": ..., "event": ..., **fields}`."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if fields:
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup(level: str = "info") -> None:
    """Send every log record to stderr as a JSON line (idempotent)."""
    root = logging.getLogger()
    if not any(isinstance(h.formatter, JsonFormatter) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiokafka", "kafka", "faust", "mode", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: object) -> None:
    """Log one structured event."""
    logger.log(level, name, extra={"fields": fields})


def records(data: bytes, name: str | None = None) -> list[dict[str, Any]]:
    """The structured log lines in `data` (a log's bytes), oldest first: JSON objects with an
    `event`, only those named `name` when given; other lines (banners, library output) skipped."""
    key = None if name is None else name.encode()
    out = []
    for line in data.splitlines():
        line = line.strip()
        if not line.startswith(b"{") or (key is not None and key not in line):
            continue
        try:
            rec = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "event" in rec and (name is None or rec["event"] == name):
            out.append(rec)
    return out
