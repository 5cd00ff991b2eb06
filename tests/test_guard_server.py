"""The guard server on loopback: OpenAI client, streaming, auth, limits, prefill, fail-closed, 429, load + audit."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from cai.constitution import load_constitution
from cai.guard.audit import AuditLog
from cai.guard.config import GuardConfig
from cai.guard.server import check_api_key, create_app
from tests.fake_openai_server import ServerThread
from tests.test_guard import StubBackend, make_guard, one_torch_thread  # noqa: F401 (autouse fixture)

HELLO = [{"role": "user", "content": "Say hello."}]


@contextmanager
def served(tmp_path, guard, **overrides):
    """Yield (base url, audit path) of a guard app on a free loopback port."""
    cfg = GuardConfig(audit_log=tmp_path / "audit.jsonl", **overrides)
    audit = AuditLog(cfg.audit_log)
    with ServerThread(create_app(guard, cfg, audit)) as srv:
        yield srv.url, cfg.audit_log
    audit.close()


def audit_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def post(url, body=None, *, content=None, headers=None):
    return httpx.post(f"{url}/chat/completions", json=body, content=content, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def tiny_guard(tiny_backend):
    return make_guard(tiny_backend, tiny_backend, max_rounds=1, critique_tokens=4)


def test_openai_client_streaming_and_endpoints(tmp_path, tiny_guard):
    from openai import OpenAI

    with served(tmp_path, tiny_guard) as (url, audit):
        client = OpenAI(base_url=url, api_key="unused")
        resp = client.chat.completions.create(model="cai-guard", messages=HELLO, max_tokens=6, temperature=0)
        ext = resp.model_extra["cai_guard"]
        assert isinstance(resp.choices[0].message.content, str) and ext["decision"] in ("pass", "revised", "refused")
        assert ext["rounds"][0]["verdicts"][0]["principle"] == "peace" and ext["request_id"] == resp.id
        chunks = list(client.chat.completions.create(model="cai-guard", messages=HELLO, max_tokens=6,
                                                     temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == resp.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason and chunks[-1].model_extra["cai_guard"]["decision"] == ext["decision"]
        with httpx.stream("POST", f"{url}/chat/completions", timeout=30,
                          json={"model": "cai-guard", "messages": HELLO, "max_tokens": 4, "stream": True}) as r:
            events = [line for line in r.iter_lines() if line]
        assert r.headers["content-type"].startswith("text/event-stream")
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
        assert [m.id for m in client.models.list().data] == ["cai-guard"]
        assert httpx.get(url.replace("/v1", "/health")).json() == {"status": "ok"}
        metrics = httpx.get(url.replace("/v1", "/metrics")).text
        assert 'cai_guard_requests_total{status="200"} 3' in metrics and "cai_guard_request_seconds_count 3" in metrics
    assert [r["status"] for r in audit_records(audit)] == [200, 200, 200]


def test_api_key_check_and_auth(tmp_path):
    assert check_api_key(None, []) and check_api_key("Bearer k1", ["k0", "k1"])
    assert not check_api_key(None, ["k1"]) and not check_api_key("Bearer k2", ["k1"])
    assert not check_api_key("k1", ["k1"]) and not check_api_key("Bearer ", ["k1"])
    body = {"model": "cai-guard", "messages": HELLO}
    with served(tmp_path, make_guard(StubBackend()), api_keys=["s3cret"]) as (url, audit):
        r = post(url, body)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert post(url, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post(url, body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url.replace("/v1", "/metrics")).status_code == 401
        assert httpx.get(f"{url}/models").status_code == 401
        assert httpx.get(url.replace("/v1", "/health")).status_code == 200
    assert [r["status"] for r in audit_records(audit)] == [401, 401, 200]


def test_bad_requests_get_openai_style_errors(tmp_path):
    ok = {"model": "cai-guard", "messages": HELLO}
    prefill = [*HELLO, {"role": "assistant", "content": "Sure, here is"}]
    with served(tmp_path, make_guard(StubBackend()), max_messages=4, max_tokens_limit=32,
                max_body_bytes=2048) as (url, audit):
        cases = [
            (post(url, content=b'{"model": "cai-guard", "messages": [', headers={"content-type": "application/json"}),
             400, "invalid_json"),
            (post(url, {**ok, "messages": prefill}), 400, "prefill_not_allowed"),
            (post(url, {**ok, "model": "gpt-9"}), 404, "model_not_found"),
            (post(url, {**ok, "messages": HELLO * 5}), 400, "too_many_messages"),
            (post(url, {**ok, "max_tokens": 33}), 400, "max_tokens_too_large"),
            (post(url, {**ok, "messages": [{"role": "user", "content": "x" * 3000}]}), 413, "body_too_large"),
            (post(url, {**ok, "messages": [{"role": "robot", "content": "hi"}]}), 400, "invalid_request"),
            (post(url, {**ok, "messages": [*HELLO, {"role": "system", "content": "hi"}]}), 400, "invalid_request"),
        ]
        for r, status, code in cases:
            assert r.status_code == status, r.text
            err = r.json()["error"]
            assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
        assert post(url, ok).status_code == 200
    assert len(audit_records(audit)) == len(cases) + 1


def test_prefill_allowed_by_operator_is_checked_whole(tmp_path):
    sup = StubBackend([0.1])
    body = {"model": "cai-guard", "messages": [*HELLO, {"role": "assistant", "content": "Sure, here is"}]}
    with served(tmp_path, make_guard(sup), allow_prefill=True) as (url, _):
        r = post(url, body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "Sure, here isanswer 1"
    assert json.dumps("Sure, here isanswer 1") in sup.prefixes[0][0]["content"]  # the supervisor saw it all


def test_fail_closed_on_supervisor_error_and_timeout(tmp_path):
    body = {"model": "cai-guard", "messages": HELLO}
    with served(tmp_path, make_guard(StubBackend(fail=True))) as (url, audit):
        r = post(url, body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "supervisor_unavailable"
    assert "answer 1" not in r.text and "withheld" in r.json()["error"]["message"]
    with served(tmp_path, make_guard(StubBackend(delay=1.5)), request_timeout_s=0.3) as (url, audit):
        r = post(url, body)
    assert r.status_code == 503 and r.json()["error"]["code"] == "guard_timeout" and "answer" not in r.json()
    assert [(a["status"], a["error"]) for a in audit_records(audit)] == [(503, "supervisor_unavailable"),
                                                                         (503, "guard_timeout")]


def test_429_when_full(tmp_path):
    body = {"model": "cai-guard", "messages": HELLO}
    with served(tmp_path, make_guard(StubBackend(delay=0.6)), max_pending=1) as (url, audit):
        with ThreadPoolExecutor(3) as pool:
            codes = sorted(pool.map(lambda _: post(url, body).status_code, range(3)))
    assert codes[0] == 200 and 429 in codes
    assert sorted(a["status"] for a in audit_records(audit)) == codes


def test_load_200_requests_16_concurrent_one_audit_record_each(tmp_path, tiny_backend):
    """The tiny model answers and checks every request (one principle; threshold 0.99 so each passes after one
    verdict, which keeps 200 requests fast)."""
    peace = load_constitution("harmless").principle("peace")
    guard = make_guard(tiny_backend, tiny_backend, threshold=0.99, principles=[peace])
    body = {"model": "cai-guard", "messages": HELLO, "max_tokens": 1}
    lock, ids = threading.Lock(), []
    with served(tmp_path, guard, max_pending=64) as (url, audit):
        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=16)) as client:
            def one(i):
                r = client.post(f"{url}/chat/completions", json={**body, "seed": i})
                with lock:
                    ids.append(r.json().get("id"))
                return r.status_code

            with ThreadPoolExecutor(16) as pool:
                codes = list(pool.map(one, range(200)))
    assert codes == [200] * 200
    records = audit_records(audit)
    assert len(records) == 200 and sorted(r["request_id"] for r in records) == sorted(ids)
    assert all(r["status"] == 200 and r["decision"] == "pass" and len(r["rounds"]) == 1 for r in records)
