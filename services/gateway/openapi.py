"""The request and response schemas of the published OpenAPI document.

Event bodies are the topic's JSON Schema (the same models as `schemas/json/`), minus
`tenant_id`, which the gateway sets from the API key.
"""

from __future__ import annotations

from typing import Any

from schemas.topics import Topic

_REF = "#/components/schemas/{model}"

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "field": {"type": ["string", "null"], "description": "The offending field, dotted (events.3.value)."},
                "type": {"type": "string"},
            },
        }
    },
}
ACCEPTED = {
    "type": "object",
    "required": ["event_id", "duplicate"],
    "properties": {
        "event_id": {"type": "string"},
        "duplicate": {"type": "boolean", "description": "Already accepted earlier; not produced again."},
    },
}
BATCH_ACCEPTED = {
    "type": "object",
    "required": ["accepted", "duplicates", "event_ids"],
    "properties": {
        "accepted": {"type": "integer"},
        "duplicates": {"type": "integer"},
        "event_ids": {"type": "array", "items": {"type": "string"}},
    },
}


def _in_name(topic: Topic) -> str:
    return f"{topic.event.__name__}In"


def _err(description: str, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}},
    }
    if retry:
        out["headers"] = {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}
    return out


def operation_doc(topic: Topic, *, batch: bool) -> dict[str, Any]:
    """Keyword arguments for `add_api_route` describing one ingest operation."""
    name = _in_name(topic)
    body_ref = {"$ref": _REF.format(model=f"{name}Batch" if batch else name)}
    parameters = []
    if not batch:
        parameters.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9._:@/+=-]+$"},
                "description": "Becomes the event_id: a retry with the same key is accepted once.",
            }
        )
    kind = "generation" if topic.name.startswith("generations") else "feedback"
    noun = "Feedback" if kind == "feedback" else "Generations"
    return {
        "operation_id": f"send{noun}{'Batch' if batch else ''}",
        "summary": f"Send {'a batch of ' if batch else 'one '}{kind} event{'s' if batch else ''} to {topic.name}",
        "description": (
            "200 means every event is durably written to Kafka (acks=all). Send the same event_id again "
            "to retry safely; ids accepted within the idempotency window are answered as duplicates."
        ),
        "response_model": None,
        "responses": {
            200: {
                "description": "Accepted (written to Kafka)",
                "content": {"application/json": {"schema": BATCH_ACCEPTED if batch else ACCEPTED}},
            },
            401: _err("Missing or invalid API key"),
            409: _err("event_id reused for a different event"),
            413: _err("Body or batch too large"),
            415: _err("Not JSON"),
            422: _err("Invalid event; `field` names the offending field"),
            429: _err("Too many events waiting for the broker", retry=True),
            503: _err("Broker unavailable or too slow", retry=True),
        },
        "openapi_extra": {
            "parameters": parameters,
            "requestBody": {"required": True, "content": {"application/json": {"schema": body_ref}}},
            "security": [{"apiKey": []}],
        },
    }


def extend_openapi(doc: dict[str, Any], max_batch_events: int) -> dict[str, Any]:
    """Add the event schemas, the batch wrappers, the error body and the security scheme."""
    from schemas.topics import FEEDBACK, GENERATIONS

    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR
    for topic in (FEEDBACK, GENERATIONS):
        schema = topic.event.model_json_schema(mode="validation", ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schema["properties"].pop("tenant_id", None)
        schema["title"] = _in_name(topic)
        schemas[_in_name(topic)] = schema
        schemas[f"{_in_name(topic)}Batch"] = {
            "type": "object",
            "additionalProperties": False,
            "required": ["events"],
            "properties": {
                "events": {
                    "type": "array",
                    "maxItems": max_batch_events,
                    "items": {"$ref": _REF.format(model=_in_name(topic))},
                }
            },
        }
    components["securitySchemes"] = {
        "apiKey": {"type": "http", "scheme": "bearer", "description": "A tenant's key from `rlfeed keys create`."}
    }
    return doc
