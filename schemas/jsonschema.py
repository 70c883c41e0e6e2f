"""Generate the committed JSON Schema files (one per topic) under `schemas/json/`.

Producers in other languages validate against these. Regenerate after changing an event:
`python -m schemas.jsonschema`; a test fails while the committed files are stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from schemas.topics import PUBLIC_TOPICS, Topic

JSON_DIR = Path(__file__).parent / "json"


def schema_for(topic: Topic) -> dict:
    """The JSON Schema of one topic's messages, with rlfeed's topic metadata."""
    schema = topic.event.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"rlfeed/{topic.name}.schema.json"
    schema["x-rlfeed-topic"] = {
        "name": topic.name,
        "key": topic.key,
        "partitions": topic.partitions,
        "compacted": topic.compacted,
    }
    return schema


def render(topic: Topic) -> bytes:
    """The file contents for one topic: sorted, indented JSON with a final newline."""
    return orjson.dumps(schema_for(topic), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


def expected_files() -> dict[Path, bytes]:
    """Every schema file as it should be on disk."""
    return {JSON_DIR / f"{t.name}.schema.json": render(t) for t in PUBLIC_TOPICS}


def write() -> list[Path]:
    """Write every schema file; return the ones that changed."""
    JSON_DIR.mkdir(exist_ok=True)
    changed = []
    for path, data in expected_files().items():
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
            changed.append(path)
    return changed


if __name__ == "__main__":
    for p in write():
        print(f"wrote {p}", file=sys.stderr)
