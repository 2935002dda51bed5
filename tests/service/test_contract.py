"""Property-based contract test of the OpenAPI document (schemathesis): for every operation,
generated requests — valid and invalid — never get a 5xx, and every answer's status, content
type and body match what the document says the operation returns.

(schemathesis' lazy pytest fixture does not run under pytest 9, so each operation's Hypothesis
strategy is driven here directly; the operations are listed from the app's own document.)"""
from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance, status_code_conformance

from service.app import create_app
from service.settings import Settings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = [(method.upper(), path) for path, methods in create_app(Settings()).openapi()["paths"].items() for method in methods]


@pytest.fixture(scope="module")
def api_schema(server):
    return schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_keeps_its_documented_contract(api_schema, method, path):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def keeps_contract(case) -> None:
        case.call_and_validate(checks=CHECKS, timeout=60)

    keeps_contract()
