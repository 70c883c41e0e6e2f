"""Structured logs: one JSON object per line on stderr.

Use `log = get_logger(__name__)` and `log.info("event_name", extra={"fields": {...}})`,
or the shorthand `event(log, "event_name", key=value)`.
"""

from __future__ import annotations

import logging
import sys

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
