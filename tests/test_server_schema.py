"""Schemathesis against the server's own OpenAPI schema: no 5xx, no response that breaks it.

Bounded: a handful of generated cases per operation (about 100 in total), on a server with
a short default output limit so every generated generation is short.
"""

from __future__ import annotations

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from server_process import ServerProcess

CASES_PER_OPERATION = 11
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def server(tiny_checkpoint_dir):
    # Output limits beyond the context are a 400: a roomy context, a short default limit.
    args = ["--model", str(tiny_checkpoint_dir), "--max-model-len", "1024", "--max-output-tokens", "8"]
    args += ["--kv-cache-memory", "64MiB"]
    with ServerProcess(args) as srv:
        yield srv


@pytest.mark.slow
def test_openapi_schema_holds(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "POST /tokenize"} <= labels
    for operation in operations:

        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(
            max_examples=CASES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case):
            case.call_and_validate(base_url=server.url, checks=CHECKS, timeout=60)

        check()
    # The cases reached the handlers: some generations succeeded and some were refused as invalid.
    counts = {}
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith("gptoss_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels] = float(value)
    print(counts)
    chat = {k: v for k, v in counts.items() if '"/v1/chat/completions"' in k}
    assert any('status="200"' in k for k in chat) and any('status="400"' in k for k in chat)
