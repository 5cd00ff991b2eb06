"""The OpenAI-compatible guard server (FastAPI under uvicorn).

``POST /v1/chat/completions`` runs :meth:`Guard.respond` in a worker thread: bearer auth, body/message/max_tokens
limits, prefill rejection, bounded admission (429 when full), a per-request timeout, fail-closed 503 when the
supervisor errors or times out. Streaming sends the *checked* answer as SSE chunks. Every chat request, answered
or rejected, gets exactly one audit record. ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Literal, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cai.backends import SamplingParams
from cai.guard.audit import AuditLog, Metrics, digest
from cai.guard.config import GuardConfig
from cai.guard.supervisor import Guard, GuardResult, PolicyError, SupervisorError


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def response(self, request_id: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        headers = {"x-request-id": request_id} if request_id else None
        if self.status == 401:
            headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=headers)


def check_api_key(authorization: str | None, keys: Sequence[str]) -> bool:
    """True when no keys are configured, or the ``Authorization: Bearer <key>`` header holds one of them."""
    if not keys:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    given = token.strip().encode()
    return any(hmac.compare_digest(given, k.encode()) for k in keys)


class _Part(BaseModel):
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[_Part]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        if any(p.type != "text" for p in self.content):
            raise ApiError(400, "only text content parts are supported", "unsupported_content", "messages")
        return "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """The OpenAI chat-completions fields the guard uses; other fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = 0
    n: int = 1
    stream: bool = False


def create_app(guard: Guard, cfg: GuardConfig, audit: AuditLog) -> FastAPI:
    """The ASGI app over a loaded :class:`Guard`; ``cfg`` supplies the limits, keys and names."""
    executor = ThreadPoolExecutor(cfg.workers, thread_name_prefix="guard")
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_app):
        yield
        executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cai guard", lifespan=lifespan)
    app.state.metrics = metrics

    def authorize(request: Request) -> None:
        if not check_api_key(request.headers.get("authorization"), cfg.api_keys):
            raise ApiError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'", "invalid_api_key")

    async def read_request(request: Request) -> ChatRequest:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise ApiError(413, f"request body over {cfg.max_body_bytes} bytes", "body_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > cfg.max_body_bytes:
                raise ApiError(413, f"request body over {cfg.max_body_bytes} bytes", "body_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"malformed JSON body: {exc}", "invalid_json") from None
        try:
            return ChatRequest.model_validate(data)
        except ValidationError as exc:
            e = exc.errors()[0]
            where = ".".join(str(p) for p in e["loc"])
            raise ApiError(400, f"{where}: {e['msg']}", "invalid_request", where or None) from None

    def check_limits(req: ChatRequest) -> tuple[list[dict], SamplingParams]:
        if req.model != cfg.served_model_name:
            raise ApiError(404, f"model {req.model!r} does not exist; this server serves {cfg.served_model_name!r}",
                           "model_not_found", "model")
        if len(req.messages) > cfg.max_messages:
            raise ApiError(400, f"{len(req.messages)} messages; at most {cfg.max_messages} are allowed",
                           "too_many_messages", "messages")
        max_tokens = req.max_completion_tokens or req.max_tokens or min(cfg.default_max_tokens, cfg.max_tokens_limit)
        if max_tokens > cfg.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of {cfg.max_tokens_limit}",
                           "max_tokens_too_large", "max_tokens")
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", "unsupported_n", "n")
        last = req.messages[-1].role
        if last == "assistant" and not cfg.allow_prefill:
            raise ApiError(400, "the last message is from the assistant (a prefilled answer); this server does not "
                           "continue prefilled answers", "prefill_not_allowed", "messages")
        if last == "system":
            raise ApiError(400, "the last message must be from the user", "invalid_request", "messages")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        return messages, SamplingParams(max_tokens, req.temperature, req.top_p, stop, req.seed, 1.1)

    async def run_guard(messages: list[dict], sampling: SamplingParams) -> GuardResult:
        if metrics.in_flight >= cfg.max_pending:
            raise ApiError(429, f"the server is busy ({cfg.max_pending} requests pending); retry shortly",
                           "rate_limited")
        loop = asyncio.get_running_loop()
        metrics.in_flight += 1
        job = executor.submit(guard.respond, messages, sampling)
        job.add_done_callback(lambda _f: loop.call_soon_threadsafe(_release))
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job)), cfg.request_timeout_s)
        except asyncio.TimeoutError:
            job.cancel()  # succeeds while still queued; a running check finishes in the background, unreleased
            raise ApiError(503, f"the answer was not checked within {cfg.request_timeout_s:g} s; nothing unchecked "
                           "is released, retry later", "guard_timeout") from None
        except SupervisorError as exc:
            raise ApiError(503, f"the supervisor could not check the answer, so it is withheld ({exc})",
                           "supervisor_unavailable") from None
        except PolicyError as exc:
            raise ApiError(502, str(exc), "policy_error") from None

    def _release() -> None:
        metrics.in_flight -= 1

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        rid, t0 = f"chatcmpl-{uuid.uuid4().hex[:24]}", time.perf_counter()
        record: dict = {"request_id": rid, "client": request.client.host if request.client else None}
        result: GuardResult | None = None
        status = 500
        try:
            authorize(request)
            req = await read_request(request)
            messages, sampling = check_limits(req)
            record.update(stream=req.stream, n_messages=len(messages), max_tokens=sampling.max_new_tokens,
                          prompt_sha=digest(messages[-1]["content"]))
            if cfg.audit_content:
                record["messages"] = messages
            result = await run_guard(messages, sampling)
            status = 200
            response = _stream(rid, cfg.served_model_name, result) if req.stream else JSONResponse(
                _completion(rid, cfg.served_model_name, result), headers={"x-request-id": rid})
            record.update(decision=result.decision, rounds=result.rounds, cost=result.extension()["cost"],
                          answer_sha=digest(result.text))
            if cfg.audit_content:
                record["answer"] = result.text
            return response
        except ApiError as exc:
            status = exc.status
            record.update(error=exc.code, message=exc.message)
            return exc.response(rid)
        finally:
            latency = time.perf_counter() - t0
            record.update(status=status, latency_s=round(latency, 4))
            audit.write(record)
            metrics.observe(status, latency, result.decision if result else None,
                            result.extension()["cost"] if result else None)

    @app.get("/v1/models")
    async def list_models(request: Request):
        try:
            authorize(request)
        except ApiError as exc:
            return exc.response()
        return {"object": "list", "data": [{"id": cfg.served_model_name, "object": "model", "created": 0,
                                            "owned_by": "cai-lab"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus(request: Request):
        try:
            authorize(request)
        except ApiError as exc:
            return exc.response()
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    return app


def _completion(rid: str, model: str, result: GuardResult) -> dict:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "finish_reason": result.finish_reason}],
        "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                  "total_tokens": result.prompt_tokens + result.completion_tokens},
        "cai_guard": {"request_id": rid, **result.extension()},
    }


def _stream(rid: str, model: str, result: GuardResult) -> StreamingResponse:
    """SSE chunks of the already-checked answer, a last chunk with the finish reason and ``cai_guard``, [DONE]."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def events():
        yield chunk({"role": "assistant", "content": ""})
        for piece in re.findall(r"\s*\S+|\s+$", result.text) or [""]:
            yield chunk({"content": piece})
        yield chunk({}, result.finish_reason, cai_guard={"request_id": rid, **result.extension()})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers={"x-request-id": rid})


def serve(cfg: GuardConfig) -> None:
    """Load both models, probe the supervisor, and serve until interrupted."""
    import uvicorn

    cfg.check_security()
    guard = Guard.from_config(cfg)
    audit = AuditLog(cfg.audit_log)
    try:
        uvicorn.run(create_app(guard, cfg, audit), host=cfg.host, port=cfg.port, log_level="warning",
                    limit_concurrency=cfg.max_pending * 4 + 16, timeout_keep_alive=5)
    finally:
        audit.close()
