"""The OpenAI-compatible guard server (FastAPI under uvicorn).

``POST /v1/chat/completions`` runs :meth:`Guard.respond` in a worker thread: bearer auth, request limits checked
up front (body size, JSON depth, messages, characters, max_tokens, stop strings, seed), prefill rejection,
bounded admission (429 when full), a per-request deadline that stops the work (or abandons it, so the next
request is served), fail-closed 503 when the supervisor errors, times out or returns scores it cannot trust.
Streaming sends the *checked* answer as SSE chunks. Every chat request, answered or rejected (overflow
included), gets exactly one bounded audit record, written by :class:`AuditMiddleware`. ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus). Every error body has OpenAI's shape; never plain text.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cai.backends import SamplingParams
from cai.backends.base import CHAT_REPETITION_PENALTY
from cai.guard.audit import AuditLog, Metrics, digest, scrub
from cai.guard.config import GuardConfig
from cai.guard.supervisor import ContextTooLong, Guard, GuardResult, PolicyError, SupervisorError

log = logging.getLogger(__name__)

CHAT_PATH = "/v1/chat/completions"
INT64 = 2**63
_CODES = {404: "not_found", 405: "method_not_allowed"}


def _short(value: object, n: int = 64) -> str:
    """A client-given value as a short repr for messages: never echo a 900 KB string back."""
    text = repr(value)
    return text if len(text) <= n else f"{text[:n]}…({len(text)} chars)"


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body: ``{"error": {"message", "type", "param", "code"}}``. ``detail``
    goes to the audit log only (it may name upstream servers)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: str | None = None,
        detail: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message[:400], code, param
        self.detail, self.headers = detail, headers

    def response(self, request_id: str | None = None) -> JSONResponse:
        return error_response(self.status, self.message, self.code, self.param, request_id, self.headers)


def error_response(
    status: int,
    message: str,
    code: str,
    param: str | None = None,
    request_id: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {**(headers or {}), **({"x-request-id": request_id} if request_id else {})}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def check_api_key(authorization: str | None, keys: Sequence[str]) -> bool:
    """True when no keys are configured, or the ``Authorization: Bearer <key>`` header holds one of them."""
    keys = [k for k in keys if k.strip()]
    if not keys:
        return True
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    given = token.strip().encode("utf-8", "surrogateescape")
    return any(hmac.compare_digest(given, k.encode()) for k in keys)


class _Part(BaseModel):
    model_config = ConfigDict(strict=True)
    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # JSON types as documented: no "stream": 0
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

    model_config = ConfigDict(extra="ignore", strict=True)  # JSON types as documented: no "stream": 0
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(0, ge=-INT64, lt=INT64)
    n: int = 1
    stream: bool = False


def json_depth(value: object) -> int:
    """Deepest nesting of lists and dicts in a parsed JSON value (iterative: no recursion limit to hit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list):
            deepest = max(deepest, d)
            stack.extend((x, d + 1) for x in v)
    return deepest


def openapi_paths(cfg: GuardConfig) -> tuple[dict, dict]:
    """(request body schema, response schemas) of the chat endpoint, with this server's limits, for the OpenAPI
    document (clients and the schema-driven fuzz tests read it)."""
    text = {"type": "string", "maxLength": cfg.max_chars}
    part = {
        "type": "object",
        "required": ["type"],
        "properties": {"type": {"type": "string"}, "text": {"type": "string", "maxLength": cfg.max_chars}},
    }
    message = {
        "type": "object",
        "required": ["role", "content"],
        "properties": {
            "role": {"type": "string", "enum": ["system", "user", "assistant"]},
            "content": {"anyOf": [text, {"type": "array", "items": part, "maxItems": 16}]},
        },
    }
    stop_item = {"type": "string", "maxLength": cfg.max_stop_chars}
    request = {
        "type": "object",
        "required": ["model", "messages"],
        "properties": {
            "model": {"type": "string", "enum": [cfg.served_model_name]},
            "messages": {"type": "array", "items": message, "minItems": 1, "maxItems": cfg.max_messages},
            "max_tokens": {
                "anyOf": [{"type": "integer", "minimum": 1, "maximum": cfg.max_tokens_limit}, {"type": "null"}]
            },
            "max_completion_tokens": {
                "anyOf": [{"type": "integer", "minimum": 1, "maximum": cfg.max_tokens_limit}, {"type": "null"}]
            },
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
            "stop": {
                "anyOf": [stop_item, {"type": "array", "items": stop_item, "maxItems": cfg.max_stop}, {"type": "null"}]
            },
            "seed": {"anyOf": [{"type": "integer", "minimum": -INT64, "maximum": INT64 - 1}, {"type": "null"}]},
            "n": {"type": "integer", "enum": [1]},
            "stream": {"type": "boolean"},
        },
    }
    error = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "param", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": "string"},
                },
            }
        },
    }
    completion = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage", "cai_guard"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["chat.completion"]},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1,
                "items": {
                    "type": "object",
                    "required": ["index", "message", "finish_reason"],
                    "properties": {
                        "message": {
                            "type": "object",
                            "required": ["role", "content"],
                            "properties": {"role": {"type": "string"}, "content": {"type": "string"}},
                        },
                        "finish_reason": {"type": "string"},
                    },
                },
            },
            "usage": {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"]},
            "cai_guard": {
                "type": "object",
                "required": ["request_id", "decision", "rounds", "cost"],
                "properties": {"decision": {"type": "string", "enum": ["pass", "revised", "refused"]}},
            },
        },
    }
    err = {"content": {"application/json": {"schema": error}}}
    responses = {
        "200": {
            "description": "the checked answer (JSON), or SSE chunks of it with stream: true",
            "content": {"application/json": {"schema": completion}, "text/event-stream": {"schema": {}}},
        },
        **{
            str(s): {"description": d, **err}
            for s, d in [
                (400, "invalid request, over a limit, prefill, or too long for a model's context"),
                (401, "missing or invalid API key"),
                (404, "unknown model"),
                (405, "method not allowed"),
                (413, "body too large"),
                (429, "too many requests pending"),
                (500, "internal error"),
                (502, "the policy failed to answer"),
                (503, "not checked (supervisor failed, untrustworthy scores, deadline) or overloaded: withheld"),
            ]
        },
    }
    return request, responses


@dataclass
class _Pool:
    """An app's worker slots (bound to the event loop that made them) and its thread pool; made on first use."""

    loop: asyncio.AbstractEventLoop | None = None
    slots: asyncio.Semaphore | None = None
    executor: ThreadPoolExecutor | None = None


def create_app(guard: Guard, cfg: GuardConfig, audit: AuditLog) -> FastAPI:
    """The ASGI app over a loaded :class:`Guard`; ``cfg`` supplies the limits, keys and names."""
    # `workers` checks run at once; as many spare threads take over from checks abandoned at their deadline.
    # Made on first use and dropped at shutdown, so an app whose lifespan ran (and ended) can serve again.
    pool = _Pool()
    metrics = Metrics()
    secrets = list(cfg.api_keys)

    def slots() -> asyncio.Semaphore:
        """The `workers` places, one semaphore per event loop (an app may be served by more than one loop)."""
        loop = asyncio.get_running_loop()
        if pool.loop is not loop or pool.slots is None:
            pool.loop, pool.slots = loop, asyncio.Semaphore(cfg.workers)
        return pool.slots

    def executor() -> ThreadPoolExecutor:
        if pool.executor is None:
            pool.executor = ThreadPoolExecutor(cfg.workers * 2, thread_name_prefix="guard")
        return pool.executor

    @asynccontextmanager
    async def lifespan(_app):
        yield
        old, pool.executor = pool.executor, None
        if old is not None:
            old.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cai guard", lifespan=lifespan, version="1")
    app.state.metrics = metrics
    request_schema, response_schemas = openapi_paths(cfg)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = _CODES.get(exc.status_code, "http_error")
        record = request.scope.get("state", {}).get("audit")
        if record is not None:
            record.update(error=code)
        message = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return error_response(exc.status_code, message, code, headers=getattr(exc, "headers", None))

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
        except RecursionError:
            data = None  # nested deeper than the parser goes: refused below
        if data is None and body.strip() != b"null" or json_depth(data) > cfg.max_json_depth:
            raise ApiError(400, f"the JSON body is nested deeper than {cfg.max_json_depth} levels", "invalid_json")
        if not isinstance(data, dict):
            raise ApiError(400, f"the JSON body must be an object, not {type(data).__name__}", "invalid_request")
        try:
            return ChatRequest.model_validate(data)
        except ValidationError as exc:
            e = exc.errors()[0]
            loc = [str(p) for p in e["loc"]]
            param = loc[0] if loc else None
            raise ApiError(400, f"{'.'.join(loc)[:80]}: {e['msg'][:200]}", "invalid_request", param) from None

    def check_limits(req: ChatRequest) -> tuple[list[dict], SamplingParams]:
        if req.model != cfg.served_model_name:
            raise ApiError(
                404,
                f"model {_short(req.model)} does not exist; this server serves " f"{cfg.served_model_name!r}",
                "model_not_found",
                "model",
            )
        if len(req.messages) > cfg.max_messages:
            raise ApiError(
                400,
                f"{len(req.messages)} messages; at most {cfg.max_messages} are allowed",
                "too_many_messages",
                "messages",
            )
        for name in ("max_tokens", "max_completion_tokens"):
            asked = getattr(req, name)
            if asked is not None and asked > cfg.max_tokens_limit:
                raise ApiError(
                    400,
                    f"{name} {_short(asked, 24)} is over this server's limit of " f"{cfg.max_tokens_limit}",
                    "max_tokens_too_large",
                    name,
                )
        max_tokens = req.max_completion_tokens or req.max_tokens or min(cfg.default_max_tokens, cfg.max_tokens_limit)
        if req.n != 1:
            raise ApiError(400, "only n=1 is supported", "unsupported_n", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > cfg.max_stop:
            raise ApiError(
                400, f"{len(stop)} stop strings; at most {cfg.max_stop} are allowed", "too_many_stop", "stop"
            )
        if any(len(s) > cfg.max_stop_chars for s in stop):
            raise ApiError(400, f"a stop string is over {cfg.max_stop_chars} characters", "stop_too_long", "stop")
        last = req.messages[-1].role
        if last == "assistant" and not cfg.allow_prefill:
            raise ApiError(
                400,
                "the last message is from the assistant (a prefilled answer); this server does not "
                "continue prefilled answers",
                "prefill_not_allowed",
                "messages",
            )
        if last == "system":
            raise ApiError(400, "the last message must be from the user", "invalid_request", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        chars = sum(len(m["content"]) for m in messages)
        if chars > cfg.max_chars:
            raise ApiError(
                400,
                f"the messages hold {chars} characters; at most {cfg.max_chars} are allowed",
                "too_many_characters",
                "messages",
            )
        for text in [m["content"] for m in messages] + stop:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ApiError(
                    400,
                    "a message or stop string holds an unpaired UTF-16 surrogate (not Unicode text)",
                    "invalid_unicode",
                    "messages",
                ) from None
        return messages, SamplingParams(
            max_new_tokens=max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=stop,
            seed=req.seed,
            repetition_penalty=CHAT_REPETITION_PENALTY,
        )

    def _abandoned_done(_f) -> None:
        metrics.abandoned -= 1

    def _on_abandoned_exit(loop, f) -> None:
        try:
            loop.call_soon_threadsafe(_abandoned_done, f)
        except RuntimeError:  # the server has shut down
            pass

    async def run_guard(messages: list[dict], sampling: SamplingParams) -> GuardResult:
        if metrics.in_flight >= cfg.max_pending:
            raise ApiError(
                429,
                f"the server is busy ({cfg.max_pending} requests pending); retry shortly",
                "rate_limited",
                headers={"Retry-After": "1"},
            )
        loop = asyncio.get_running_loop()
        at = time.monotonic() + cfg.request_timeout_s  # one deadline: queueing, answer and check together
        timeout = ApiError(
            503,
            f"the answer was not checked within {cfg.request_timeout_s:g} s; nothing unchecked "
            "is released, retry later",
            "guard_timeout",
        )
        metrics.in_flight += 1
        try:
            sem = slots()
            if not await _acquire_before(sem, at):
                raise timeout
            try:
                job = executor().submit(guard.respond, messages, sampling, deadline_at=at)
                fut = asyncio.wrap_future(job)
                try:
                    return await asyncio.wait_for(asyncio.shield(fut), max(0.0, at - time.monotonic()))
                except TimeoutError:
                    if job.done() and not job.cancelled() and job.exception() is not None:
                        raise  # the work itself stopped at its deadline (DeadlineExceeded)
                    if not job.cancel():  # running: stops at its next deadline check; the slot is freed now
                        metrics.abandoned += 1
                        job.add_done_callback(lambda f: _on_abandoned_exit(loop, f))
                    fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieve, never log
                    raise timeout from None
            finally:
                sem.release()
        except TimeoutError:  # DeadlineExceeded from the work
            raise timeout from None
        except ContextTooLong as exc:
            who = "supervisor" if isinstance(exc, SupervisorError) else "policy"
            raise ApiError(
                400,
                f"the conversation is too long for the {who} model's context ({exc}); nothing "
                "is cut from what the supervisor reads, so shorten the conversation",
                "context_length_exceeded",
                "messages",
            ) from None
        except SupervisorError as exc:
            raise ApiError(
                503,
                "the supervisor could not check the answer, so it is withheld; retry later",
                "supervisor_unavailable",
                detail=scrub(str(exc), secrets),
            ) from None
        except PolicyError as exc:
            raise ApiError(
                502, "the policy model failed to answer; retry later", "policy_error", detail=scrub(str(exc), secrets)
            ) from None
        finally:
            metrics.in_flight -= 1

    @app.post(
        CHAT_PATH,
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}}},
        responses=response_schemas,
    )
    async def chat_completions(request: Request):
        record: dict = request.scope.setdefault("state", {}).setdefault("audit", {})
        rid = record.setdefault("request_id", f"chatcmpl-{uuid.uuid4().hex[:24]}")
        try:
            authorize(request)
            req = await read_request(request)
            messages, sampling = check_limits(req)
            record.update(
                stream=req.stream,
                n_messages=len(messages),
                max_tokens=sampling.max_new_tokens,
                prompt_sha=digest(messages[-1]["content"]),
            )
            if cfg.audit_content:
                record["messages"] = messages
            result = await run_guard(messages, sampling)
            # rendered in full before the status line goes out: a body that cannot be sent is a 500, not a 200
            response = (
                _stream(rid, cfg.served_model_name, result)
                if req.stream
                else JSONResponse(_completion(rid, cfg.served_model_name, result), headers={"x-request-id": rid})
            )
            record.update(
                decision=result.decision,
                rounds=result.rounds,
                cost=result.extension()["cost"],
                answer_sha=digest(result.text),
            )
            if cfg.audit_content:
                record["answer"] = result.text
            return response
        except ApiError as exc:
            record.update(error=exc.code, message=exc.message)
            if exc.detail:
                record["detail"] = exc.detail
            return exc.response(rid)

    unauthorized: dict[int | str, dict[str, Any]] = {
        401: {
            "description": "missing or invalid API key",
            "content": {
                "application/json": {"schema": response_schemas["401"]["content"]["application/json"]["schema"]}
            },
        }
    }

    @app.get("/v1/models", responses=unauthorized)
    async def list_models(request: Request):
        try:
            authorize(request)
        except ApiError as exc:
            return exc.response()
        return {
            "object": "list",
            "data": [{"id": cfg.served_model_name, "object": "model", "created": 0, "owned_by": "cai-lab"}],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse, responses=unauthorized)
    async def prometheus(request: Request):
        try:
            authorize(request)
        except ApiError as exc:
            return exc.response()
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    app.add_middleware(AuditMiddleware, audit=audit, metrics=metrics, limit=cfg.connection_limit)
    return app


async def _acquire_before(sem: asyncio.Semaphore, at: float) -> bool:
    """Acquire ``sem`` unless ``time.monotonic()`` passes ``at`` first; never leaks a permit on a race."""
    task = asyncio.ensure_future(sem.acquire())
    done, _ = await asyncio.wait({task}, timeout=max(0.0, at - time.monotonic()))
    if done:
        return True
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return False
    sem.release()  # acquired while being cancelled: give it back
    return False


class AuditMiddleware:
    """Outside the routes, so nothing escapes it: one audit record and one metrics count per chat request,
    whatever answers it (the route, a 404/405, an overflow rejection, an unexpected fault: JSON 500). Also the
    server's own concurrency limit, answered with a JSON 503 (uvicorn's limit_concurrency would answer plain
    text, unaudited)."""

    def __init__(self, app, audit: AuditLog, metrics: Metrics, limit: int):
        self.app, self.audit, self.metrics, self.limit = app, audit, metrics, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") == "/health":
            return await self.app(scope, receive, send)
        chat = scope.get("path", "").rstrip("/") == CHAT_PATH
        t0 = time.perf_counter()
        client = scope.get("client")
        record = {"request_id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "client": client[0] if client else None}
        if chat and scope.get("method") != "POST":
            record["method"] = str(scope.get("method"))[:16]
        state = scope.setdefault("state", {})
        state["audit"] = record
        started: dict = {}

        async def send_watch(message):
            if message["type"] == "http.response.start":
                started["status"] = message["status"]
            await send(message)

        overloaded = self.metrics.connections >= self.limit
        self.metrics.connections += 1
        try:
            if overloaded:
                record.update(error="server_overloaded", message="connection limit reached")
                await error_response(
                    503,
                    f"the server is handling {self.limit} requests; retry shortly",
                    "server_overloaded",
                    request_id=record["request_id"],
                    headers={"Retry-After": "1"},
                )(scope, receive, send_watch)
            else:
                await self.app(scope, receive, send_watch)
        except Exception as exc:  # a bug or a lost client; never a plain-text 500, never unaudited
            if "status" not in started:
                log.exception("guard: unexpected error answering %s", scope.get("path"))
                record.update(error="internal_error", detail=f"{type(exc).__name__}: {exc}"[:500])
                try:
                    await error_response(
                        500, "internal error; the answer is withheld", "internal_error", request_id=record["request_id"]
                    )(scope, receive, send_watch)
                except Exception:  # the client is gone
                    pass
            else:
                record.update(error="response_interrupted", detail=f"{type(exc).__name__}"[:200])
        finally:
            self.metrics.connections -= 1
            if chat:
                latency = time.perf_counter() - t0
                status = started.get("status", 499)  # 499: the client left before any answer
                record.update(status=status, latency_s=round(latency, 4))
                try:
                    self.audit.write(record)
                finally:
                    self.metrics.observe(
                        status, latency, record.get("decision"), record.get("cost"), record.get("error")
                    )


def _completion(rid: str, model: str, result: GuardResult) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
        "cai_guard": {"request_id": rid, **result.extension()},
    }


def _stream(rid: str, model: str, result: GuardResult) -> StreamingResponse:
    """SSE chunks of the already-checked answer, a last chunk with the finish reason and ``cai_guard``, [DONE].
    Every chunk is rendered (strict JSON) before the response starts."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> str:
        body = {
            "id": rid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            **extra,
        }
        return f"data: {json.dumps(body, ensure_ascii=False, allow_nan=False)}\n\n"

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in re.findall(r"\s*\S+|\s+$", result.text) or [""]]
    events.append(chunk({}, result.finish_reason, cai_guard={"request_id": rid, **result.extension()}))
    events.append("data: [DONE]\n\n")
    return StreamingResponse(iter(events), media_type="text/event-stream", headers={"x-request-id": rid})


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind the listening socket before any model loads: a port in use is a one-line error, not a crash after
    minutes of loading."""
    from cai.errors import UserError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise UserError(f"--host {host!r} is not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        why = "is already in use" if exc.errno in (98, 48, 10048) else f"cannot be bound ({exc.strerror})"
        raise UserError(
            f"--host {host} --port {port}: the address {why}; stop the other server or pass " "another --port"
        ) from None
    sock.set_inheritable(True)
    return sock


def serve(cfg: GuardConfig, announce=None) -> None:
    """Bind the port and open the audit log (both fail fast, with one line), then ``announce()``, load both
    models, probe the supervisor, and serve until interrupted."""
    import uvicorn

    cfg.check_security()
    sock = bind_socket(cfg.host, cfg.port)
    audit = None
    try:
        audit = AuditLog(cfg.audit_log, cfg.audit_max_chars)
        if announce is not None:
            announce()
        guard = Guard.from_config(cfg)
        config = uvicorn.Config(create_app(guard, cfg, audit), log_level="warning", timeout_keep_alive=5)
        uvicorn.Server(config).run(sockets=[sock])  # no limit_concurrency: AuditMiddleware answers overflow
    finally:
        sock.close()
        if audit is not None:
            audit.close()
