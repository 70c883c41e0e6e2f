"""The stack's state file (`<home_dir>/stack.json`), read by `rlfeed status`.

chdb locks its data directory to the process that owns it, so other commands learn
what the stack holds from this file, which the stack rewrites every status interval.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

STATE_FILE = "stack.json"


def write(home_dir: Path, state: dict) -> None:
    """Atomically replace the state file."""
    home_dir.mkdir(parents=True, exist_ok=True)
    tmp = home_dir / (STATE_FILE + ".tmp")
    tmp.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2, default=str))
    os.replace(tmp, home_dir / STATE_FILE)


def read(home_dir: Path) -> dict | None:
    """The state of a running stack, or None when none runs (or its process died)."""
    try:
        state = orjson.loads((home_dir / STATE_FILE).read_bytes())
        os.kill(int(state["pid"]), 0)
    except (FileNotFoundError, ValueError, KeyError, ProcessLookupError, PermissionError):
        return None
    return state


def clear(home_dir: Path) -> None:
    (home_dir / STATE_FILE).unlink(missing_ok=True)
