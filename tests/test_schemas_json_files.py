"""The committed JSON Schema files match the pydantic models."""

from __future__ import annotations

import orjson

from schemas.jsonschema import JSON_DIR, expected_files


def test_committed_json_schemas_are_current() -> None:
    stale = [p.name for p, data in expected_files().items() if not p.exists() or p.read_bytes() != data]
    assert not stale, f"stale JSON Schema files {stale}: run `python -m schemas.jsonschema` and commit"
    extra = {p.name for p in JSON_DIR.glob("*.json")} - {p.name for p in expected_files()}
    assert not extra, f"JSON Schema files for no registry topic: {extra}"


def test_json_schema_describes_the_key_and_required_fields() -> None:
    schema = orjson.loads((JSON_DIR / "feedback.v1.schema.json").read_bytes())
    assert schema["x-rlfeed-topic"]["key"] == "generation_id"
    assert {"generation_id", "kind", "user_id"} <= set(schema["required"])
    assert schema["additionalProperties"] is False
