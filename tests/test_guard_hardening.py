"""Issue 13: the guard never fails open, every request is bounded and audited (regression tests, one per defect)."""

from __future__ import annotations

import json
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cai.backends import Generation
from cai.guard.supervisor import SupervisorError
from tests.test_guard import SAMPLING, USER, StubBackend, make_guard, one_torch_thread  # noqa: F401 (autouse)
from tests.test_guard_server import HELLO, post, served

OK = {"model": "cai-guard", "messages": HELLO}


def strict_records(path) -> list[dict]:
    """Audit lines parsed as strict JSON (NaN/Infinity are not JSON and fail here)."""
    def no_constant(name):
        raise ValueError(f"non-JSON constant {name} in the audit log")

    return [json.loads(line, parse_constant=no_constant) for line in path.read_text(encoding="utf-8").split("\n")
            if line]


class Scores(StubBackend):
    """A supervisor that returns the given rows of verdict log-probs as they are."""

    def __init__(self, rows):
        super().__init__()
        self.rows = rows

    def logprobs(self, prefixes, continuations, **_):
        return self.rows(len(prefixes)) if callable(self.rows) else self.rows


NAN, INF = math.nan, math.inf


# ---- 1. non-finite or missing scores fail closed --------------------------------------------------------------
@pytest.mark.parametrize("rows", [
    lambda n: [[NAN, NAN]] * n,
    lambda n: [[-INF, -INF]] * n,
    lambda n: [[NAN, -0.1]] * n,
    lambda n: [[INF, -1.0]] * n,
    lambda n: [[-0.1]] * n,  # one score of two
    lambda n: [[-2.0, -0.1]] * (n - 1),  # a principle left unscored
    lambda n: [["-2", -0.1]] * n,
], ids=["nan", "both-neg-inf", "one-nan", "pos-inf", "short-row", "missing-row", "not-a-number"])
def test_untrustworthy_scores_raise_supervisor_error(rows):
    with pytest.raises(SupervisorError):
        make_guard(Scores(rows)).respond(USER, SAMPLING)


def test_one_zero_probability_answer_is_still_a_valid_score():
    r = make_guard(Scores(lambda n: [[-INF, 0.0]] * n)).respond(USER, SAMPLING)
    assert r.decision == "pass" and r.rounds[0]["verdicts"][0]["p_violation"] == 0.0


def test_nan_scores_are_503_audited_and_counted_streaming_or_not(tmp_path):
    guard = make_guard(Scores(lambda n: [[NAN, NAN]] * n))
    with served(tmp_path, guard) as (url, audit):
        plain = post(url, OK)
        with httpx.stream("POST", f"{url}/chat/completions", json={**OK, "stream": True}, timeout=30) as r:
            streamed = (r.status_code, r.headers["content-type"], r.read().decode())
        metrics = httpx.get(url.replace("/v1", "/metrics")).text
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "supervisor_unavailable"
    assert "answer 1" not in plain.text
    assert streamed[0] == 503 and streamed[1].startswith("application/json") and "answer 1" not in streamed[2]
    assert json.loads(streamed[2])["error"]["code"] == "supervisor_unavailable"
    records = strict_records(audit)
    assert [(a["status"], a["error"]) for a in records] == [(503, "supervisor_unavailable")] * 2
    assert 'cai_guard_requests_total{status="503"} 2' in metrics


# ---- 2. request limits, validated up front -------------------------------------------------------------------
def test_request_limits_are_400s_in_openai_shape(tmp_path):
    cases = [
        ({**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({**OK, "stop": "x" * 65}, 400, "stop"),
        ({**OK, "stop": ["x" * 2000]}, 400, "stop"),
        ({**OK, "seed": 2**70}, 400, "seed"),
        ({**OK, "seed": -(2**70)}, 400, "seed"),
        ({**OK, "messages": [{"role": "user", "content": "y" * 200_000}]}, 400, "messages"),
        ({**OK, "max_tokens": 10**9}, 400, "max_tokens"),
        ({**OK, "max_tokens": 0}, 400, "max_tokens"),
        ({**OK, "temperature": 3}, 400, "temperature"),
    ]
    with served(tmp_path, make_guard(StubBackend())) as (url, audit):
        responses = [post(url, body) for body, _, _ in cases]
        deep = post(url, content=b'{"model": "cai-guard", "x": ' + b"[" * 1000 + b"]" * 1000 + b', "messages": []}',
                    headers={"content-type": "application/json"})
        fine = post(url, {**OK, "stop": ["a", "b", "c", "d"], "seed": 2**63 - 1})
    for (body, status, param), r in zip(cases, responses):
        assert r.status_code == status, (param, r.text[:300])
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param and len(err["message"]) < 500
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_json"
    assert fine.status_code == 200, fine.text
    assert len(strict_records(audit)) == len(cases) + 2


def test_stop_strings_are_cheap_and_still_stop(tiny_backend):
    """transformers' stop_strings builds a table over the vocabulary per string (seconds each); the backend
    stops on text instead."""
    import random

    from cai.backends import SamplingParams

    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, top_p=1.0, seed=0, repetition_penalty=1.0)
    chat = [{"role": "user", "content": "Count to ten."}]
    free = tiny_backend.generate([chat], greedy)[0]
    assert free.completion_tokens > 4 and len(free.text) > 6
    stop = free.text[len(free.text) // 2:][:3]
    cut = tiny_backend.generate([chat], SamplingParams(max_new_tokens=12, temperature=0.0, top_p=1.0, stop=[stop], seed=0, repetition_penalty=1.0))[0]
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.find(stop)]
    assert cut.completion_tokens < free.completion_tokens
    rnd = random.Random(0)
    junk = ["".join(rnd.choice("abcdefghij <>{}") for _ in range(64)) for _ in range(4)]
    t0 = time.perf_counter()
    tiny_backend.generate([chat], SamplingParams(max_new_tokens=4, temperature=0.0, top_p=1.0, stop=junk, seed=0, repetition_penalty=1.0))
    assert time.perf_counter() - t0 < 2.5  # was 8.4 s (4 × 64 characters) before


# ---- 3. the supervisor reads the whole conversation or nothing is released ------------------------------------
def test_verdict_prompt_over_the_supervisor_context_is_refused_not_truncated(tmp_path, tiny_backend):
    from cai.backends import ContextLengthError

    guard = make_guard(tiny_backend, tiny_backend, max_rounds=0)
    long = [{"role": "user", "content": "<" * 700}]  # each "<" is quoted as \u003c: ~4,400 verdict tokens
    with pytest.raises(SupervisorError) as info:
        guard.respond(long, SAMPLING)
    assert isinstance(info.value.__cause__, ContextLengthError)
    with served(tmp_path, guard) as (url, audit):
        r = post(url, {**OK, "messages": long, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "supervisor" in r.json()["error"]["message"]
    assert [a["status"] for a in strict_records(audit)] == [400]


def test_policy_context_overflow_is_400_not_502(tmp_path):
    class TooLong(StubBackend):
        def generate(self, chats, sampling, *, progress=False):
            return [Generation("", "error", 9000, 0) for _ in chats]

    with served(tmp_path, make_guard(StubBackend(), TooLong())) as (url, _):
        r = post(url, OK)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


# ---- 5. audit and status gaps ----------------------------------------------------------------------------------
def test_huge_model_name_is_not_echoed_and_audit_fields_are_bounded(tmp_path):
    with served(tmp_path, make_guard(StubBackend()), max_body_bytes=2_000_000) as (url, audit):
        r = post(url, {**OK, "model": "m" * 900_000})
    assert r.status_code == 404 and len(r.text) < 1000
    line = audit.read_text()
    assert len(line) < 8000 and strict_records(audit)[0]["error"] == "model_not_found"


def test_supervisor_failure_detail_is_audited_not_shown(tmp_path):
    class Down(StubBackend):
        def logprobs(self, prefixes, continuations, **_):
            raise RuntimeError("model server for 'openai:m@http://user:pw@10.1.2.3:9/v1' is unreachable "
                               "(http://user:pw@10.1.2.3:9/v1/completions: ConnectError)")

    with served(tmp_path, make_guard(Down())) as (url, audit):
        r = post(url, OK)
    assert r.status_code == 503 and "10.1.2.3" not in r.text and "ConnectError" not in r.text
    rec = strict_records(audit)[0]
    assert rec["error"] == "supervisor_unavailable" and "ConnectError" in rec["detail"] and "pw" not in rec["detail"]


def test_unexpected_fault_is_a_json_500_audited_once(tmp_path):
    guard = make_guard(StubBackend())
    guard.respond = lambda *a, **k: {}["bug"]  # a bug, not a model failure
    with served(tmp_path, guard) as (url, audit):
        r = post(url, OK)
        wrong_method = httpx.get(f"{url}/chat/completions")
        no_route = httpx.post(f"{url}/completion", json=OK)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    assert no_route.status_code == 404 and no_route.json()["error"]["code"] == "not_found"
    assert [(a["status"], a.get("error")) for a in strict_records(audit)] == [(500, "internal_error"),
                                                                             (405, "method_not_allowed")]


def test_overflow_rejections_are_json_audited_and_counted(tmp_path):
    """More requests at once than the server handles get a JSON 503 that is audited and counted (uvicorn's own
    limit_concurrency answered with plain text, unaudited). Three slow uploads hold the three places."""
    body = json.dumps(OK).encode()

    def slow_upload():
        yield body[:10]
        time.sleep(1.0)
        yield body[10:]

    with served(tmp_path, make_guard(StubBackend()), max_connections=3) as (url, audit):
        with ThreadPoolExecutor(3) as pool:
            slow = [pool.submit(post, url, content=slow_upload(), headers={"content-type": "application/json"})
                    for _ in range(3)]
            time.sleep(0.5)
            rejected = [post(url, OK) for _ in range(2)]
            slow = [f.result() for f in slow]
        metrics = httpx.get(url.replace("/v1", "/metrics")).text
    assert [r.status_code for r in slow] == [200] * 3
    assert [r.status_code for r in rejected] == [503] * 2
    assert all(r.headers["content-type"] == "application/json" for r in rejected)
    assert all(r.json()["error"]["code"] == "server_overloaded" for r in rejected)
    assert sorted(a["status"] for a in strict_records(audit)) == [200] * 3 + [503] * 2
    assert 'cai_guard_requests_total{status="503"} 2' in metrics


def test_a_timed_out_check_does_not_hold_the_worker(tmp_path):
    """The first request's policy hangs (and never looks at the deadline); it times out, its work is abandoned,
    and the next request is served at once instead of queueing behind it."""
    release = threading.Event()

    class HangsOnce(StubBackend):
        def generate(self, chats, sampling, *, progress=False):
            if not self.chats:
                self.chats.extend(chats)
                release.wait(5)
                return [Generation("late", "stop", 5, 3)]
            return super().generate(chats, sampling)

    with served(tmp_path, make_guard(StubBackend(), HangsOnce()), request_timeout_s=0.5) as (url, audit):
        t0 = time.perf_counter()
        first = post(url, OK)
        second = post(url, OK)
        took = time.perf_counter() - t0
        release.set()
    assert first.status_code == 503 and first.json()["error"]["code"] == "guard_timeout"
    assert second.status_code == 200 and took < 3.0
    assert [a["status"] for a in strict_records(audit)] == [503, 200]


def test_deadline_stops_hf_generation_between_tokens(tiny_backend):
    from cai.backends import DeadlineExceeded, SamplingParams, deadline

    chat = [{"role": "user", "content": "Write a long story."}]
    with deadline(time.monotonic() - 1), pytest.raises(DeadlineExceeded):
        tiny_backend.generate([chat], SamplingParams(max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0, repetition_penalty=1.0))
    with deadline(time.monotonic() - 1), pytest.raises(DeadlineExceeded):
        tiny_backend.logprobs([chat], [[" Yes", " No"]])
    t0 = time.perf_counter()
    with deadline(time.monotonic() + 0.2), pytest.raises(DeadlineExceeded):
        tiny_backend.generate([chat], SamplingParams(max_new_tokens=1500, temperature=0.0, top_p=1.0, seed=0, repetition_penalty=1.0))
    assert time.perf_counter() - t0 < 2.0


def test_load_script_small_run_audits_every_request(tmp_path):
    """cai.bench.guard_load (the 200-client figures in docs/guard.md), at a CI size: 40 clients, 240 requests."""
    from cai.bench.guard_load import main

    s = main(["--clients", "40", "--requests", "240", "--seconds", "60", "--max-pending", "8", "--policy-ms", "5",
              "--supervisor-ms", "5", "--out", str(tmp_path / "load.json")])
    assert s["requests"] == 240 and s["audit_equals_requests"] and s["metrics_requests_total"] == 240
    assert set(s["status"]) <= {"200", "429", "503"} and s["status"].get("200", 0) > 0


def test_app_serves_again_after_a_lifespan_ends(tmp_path):
    """The worker pool is made on first use, not at app creation: an app whose lifespan ended (a test client,
    a server restart in-process) answered every later request with a 500 from a shut-down executor."""
    from fastapi.testclient import TestClient

    from cai.guard.audit import AuditLog
    from cai.guard.config import GuardConfig
    from cai.guard.server import create_app

    cfg = GuardConfig(audit_log=tmp_path / "a.jsonl")
    app = create_app(make_guard(StubBackend()), cfg, AuditLog(cfg.audit_log))
    for _ in range(2):
        with TestClient(app) as client:
            assert client.post("/v1/chat/completions", json=OK).status_code == 200
    assert [a["status"] for a in strict_records(cfg.audit_log)] == [200, 200]
