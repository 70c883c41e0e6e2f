"""Property-based tests generated from the gateway's published OpenAPI document.

Schemathesis sends valid and invalid bodies and headers to every operation of a running
gateway (real uvicorn, real broker); the gateway must never answer 5xx, and its answers
must match the status codes and content types the document declares. (Schemathesis'
pytest plugin loader does not work with this pytest, so each operation's hypothesis
strategy is driven directly.)
"""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from tests import test_gateway_support as support
from tests.test_gateway_support import GatewayEnv

gateway_env = support.gateway_env

OPERATIONS = [
    ("POST", "/v1/feedback"),
    ("POST", "/v1/feedback/batch"),
    ("POST", "/v1/generations"),
    ("POST", "/v1/generations/batch"),
    ("GET", "/health"),
    ("GET", "/metrics"),
]


def test_every_operation_is_covered(gateway_env: GatewayEnv):
    spec = schemathesis.openapi.from_url(f"{gateway_env.url}/openapi.json")
    published = {(r.ok().method.upper(), r.ok().path) for r in spec.get_all_operations()}
    assert published == set(OPERATIONS)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize(("method", "path"), OPERATIONS)
def test_no_server_errors_on_generated_input(
    gateway_env: GatewayEnv,
    method: str,
    path: str,
    mode: GenerationMode,
):
    if method == "GET" and mode == GenerationMode.NEGATIVE:
        pytest.skip("a GET without parameters has no invalid input")
    spec = schemathesis.openapi.from_url(f"{gateway_env.url}/openapi.json")
    operation = spec[path][method]
    auth = gateway_env.auth()
    statuses: Counter[int] = Counter()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    def check(case) -> None:
        response = case.call_and_validate(
            headers=auth,
            timeout=30,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance],
        )
        statuses[response.status_code] += 1

    check()
    print(method, path, mode.value, dict(statuses))
    if mode == GenerationMode.POSITIVE and method == "POST":
        assert statuses[200] > 0, f"no generated event was accepted: {dict(statuses)}"
