"""Schema-driven fuzzing of the guard (Schemathesis, in-process ASGI, stub backends): for requests generated from
the guard's own OpenAPI document, valid and invalid alike, no response is a 5xx, every status and body matches
the schema, every error has OpenAI's shape, and every chat request leaves exactly one audit record with its
status. The budget is the "ci" Hypothesis profile of conftest.py (derandomized)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from cai.guard.audit import AuditLog  # noqa: E402
from cai.guard.config import GuardConfig  # noqa: E402
from cai.guard.server import create_app  # noqa: E402
from tests.test_guard import StubBackend, make_guard  # noqa: E402

_TMP = tempfile.TemporaryDirectory(prefix="cai-guard-fuzz-")
AUDIT = Path(_TMP.name) / "audit.jsonl"
CFG = GuardConfig(audit_log=AUDIT, max_messages=8, max_tokens_limit=64, max_chars=4000, max_body_bytes=64_000)
APP = create_app(make_guard(StubBackend([0.1, 0.9])), CFG, AuditLog(AUDIT))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def audit_lines() -> list[dict]:
    return [json.loads(line) for line in AUDIT.read_text(encoding="utf-8").split("\n") if line]


@schema.parametrize()
def test_guard_api_conforms_to_its_schema(case):
    chat = case.path == "/v1/chat/completions"
    before = len(audit_lines()) if AUDIT.exists() else 0
    response = case.call()
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    if response.status_code != 413:  # a body over max_body_bytes is rejected before it is read: also a rejection
        checks.append(negative_data_rejection)
    case.validate_response(response, checks=checks)
    if response.status_code >= 400 and response.headers.get("content-type", [""])[0].startswith("application/json"):
        err = response.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and len(err["message"]) <= 400
    if chat:
        records = audit_lines()
        assert len(records) == before + 1
        assert records[-1]["status"] == response.status_code and len(json.dumps(records[-1])) < 64_000
