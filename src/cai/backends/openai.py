"""Any OpenAI-compatible server (vLLM, llama.cpp, Ollama, TGI, hosted APIs) over HTTP.

Generation uses ``/chat/completions``. Log-probabilities of *given* text need two things that not every
server has: a ``/tokenize`` endpoint and ``/completions`` with ``echo`` + ``logprobs`` (vLLM provides both).
Servers without them get a clear error that names the alternatives.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cai.backends.base import (
    Chat,
    DeadlineExceeded,
    Generation,
    Prefix,
    SamplingParams,
    current_deadline,
    deadline,
    refuse_constraint,
    time_left,
    truncate_at_stop,
)
from cai.errors import UserError

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class LogprobsUnsupported(UserError):
    """The server cannot score given text."""


class OpenAIBackend:
    """Bounded-concurrency client with retries, backoff and timeouts, round-robin over several base URLs."""

    def __init__(
        self,
        spec: str,
        model: str,
        base_urls: Sequence[str],
        *,
        api_key: str | None = None,
        concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 4,
    ):
        import httpx

        self.spec, self.model, self.base_urls = spec, model, list(base_urls)
        key = api_key or os.environ.get("CAI_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {key}"})
        self.concurrency, self.retries = max(1, concurrency), retries
        self._rr = itertools.cycle(range(len(self.base_urls)))
        self._lock = threading.Lock()

    # ---- HTTP ------------------------------------------------------------------------------------------
    def _next_base(self) -> str:
        with self._lock:
            return self.base_urls[next(self._rr)]

    def _post(self, path: str, payload: dict[str, Any], *, root: bool = False) -> dict[str, Any]:
        import httpx

        last: str = ""
        for attempt in range(self.retries + 1):
            base = self._next_base()
            url = (base.rsplit("/v1", 1)[0] if root else base) + path
            left = time_left()  # under a deadline (the guard's), no request outlives it
            if left is not None and left <= 0:
                raise DeadlineExceeded(f"request to {self.spec!r} stopped: past its deadline")
            try:
                r = (
                    self.client.post(url, json=payload)
                    if left is None
                    else self.client.post(url, json=payload, timeout=left)
                )
            except httpx.TransportError as exc:  # connection refused, timeouts, resets
                last = f"{url}: {type(exc).__name__}"
            else:
                if r.status_code < 400:
                    return r.json()
                last = f"{url}: HTTP {r.status_code} {r.text[:200]!r}"
                if r.status_code not in RETRY_STATUS:
                    raise _HTTPStatus(r.status_code, last)
            if attempt < self.retries:
                pause = min(8.0, 0.5 * 2**attempt) * (0.5 + random.random())
                left = time_left()
                if left is not None and left <= pause:
                    raise DeadlineExceeded(f"request to {self.spec!r} stopped: past its deadline ({last})")
                time.sleep(pause)
        raise UserError(
            f"model server for {self.spec!r} is unreachable or failing after {self.retries + 1} tries "
            f"({last}); check that it is running and the URL in the spec is right"
        )

    def _map(self, fn, items: Sequence[Any], progress: bool = False, desc: str = "requests") -> list[Any]:
        from tqdm.auto import tqdm

        at = current_deadline()  # context variables do not cross into the pool's threads by themselves

        def job(item):
            with deadline(at):
                return fn(item)

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(job, items), total=len(items), desc=desc, disable=not progress, leave=False))

    # ---- generation ------------------------------------------------------------------------------------
    def generate(self, chats: Sequence[Chat], sampling: SamplingParams, *, progress: bool = False) -> list[Generation]:
        refuse_constraint(self.spec, sampling)

        def one(indexed: tuple[int, Chat]) -> Generation:
            i, chat = indexed
            payload: dict[str, Any] = {
                "model": self.model,
                "messages": list(chat),
                "max_tokens": sampling.max_new_tokens,
                "temperature": max(sampling.temperature, 0.0),
                "top_p": sampling.top_p,
            }
            if sampling.stop:
                payload["stop"] = list(sampling.stop)
            if sampling.seed is not None:
                payload["seed"] = sampling.seed + i
            if chat and chat[-1].get("role") == "assistant":  # prefill: vLLM's extension
                payload.update(continue_final_message=True, add_generation_prompt=False)
            try:
                data = self._post("/chat/completions", payload)
            except _HTTPStatus as exc:
                if exc.status == 400 and "context" in exc.message.lower():
                    return Generation("", "error")
                raise UserError(f"model server for {self.spec!r} rejected a request ({exc.message})") from None
            choice = data["choices"][0]
            text, stopped = truncate_at_stop(choice["message"].get("content") or "", sampling.stop)
            usage = data.get("usage") or {}
            finish = "stop" if stopped or choice.get("finish_reason") == "stop" else "length"
            return Generation(text, finish, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0))

        return self._map(one, list(enumerate(chats)), progress, "generating")

    # ---- scoring ---------------------------------------------------------------------------------------
    def _tokenize(self, prefix: Prefix | None = None, text: str | None = None) -> list[int]:
        payload: dict[str, Any] = {"model": self.model}
        if isinstance(prefix, list):
            cont = bool(prefix) and prefix[-1].get("role") == "assistant"
            payload.update(messages=prefix, add_generation_prompt=not cont, continue_final_message=cont)
        else:
            payload.update(prompt=prefix if prefix is not None else text, add_special_tokens=False)
        try:
            return list(self._post("/tokenize", payload, root=True)["tokens"])
        except (_HTTPStatus, KeyError):
            raise self._unsupported() from None

    def _unsupported(self) -> LogprobsUnsupported:
        return LogprobsUnsupported(
            f"the server behind {self.spec!r} cannot score log-probabilities of given text (needs /tokenize and "
            "/v1/completions with echo+logprobs, as vLLM provides); use a vLLM server or a local model as "
            "feedback or LLM judge, the offline judge (--judge refusal), or a preference source that needs no "
            "judge (revision, contrastive)"
        )

    def logprobs(
        self, prefixes: Sequence[Prefix], continuations: Sequence[Sequence[str]], *, truncate: bool = True
    ) -> list[list[float]]:
        """Each distinct prefix and each distinct continuation is tokenized once (k answer options over n
        prompts cost n + k /tokenize calls, not 2nk); then one /completions request (echo) scores each pair.
        The server never truncates: a prompt over its context is an error whatever ``truncate`` says."""
        import json

        def key(prefix: Prefix) -> str:
            return json.dumps(prefix, sort_keys=True) if isinstance(prefix, list) else "\0" + prefix

        distinct = {key(p): p for p in prefixes}
        pkeys = list(distinct)
        ptoks = dict(zip(pkeys, self._map(lambda k: self._tokenize(distinct[k]), pkeys), strict=False))
        texts = sorted({c for conts in continuations for c in conts})
        ctoks = dict(zip(texts, self._map(lambda t: self._tokenize(text=t), texts), strict=False))
        jobs = [(ptoks[key(p)], ctoks[c]) for p, conts in zip(prefixes, continuations, strict=False) for c in conts]

        def one(job: tuple[list[int], list[int]]) -> float:
            pids, cids = job
            payload = {
                "model": self.model,
                "prompt": pids + cids,
                "max_tokens": 1,
                "echo": True,
                "logprobs": 0,
                "temperature": 0,
            }
            try:
                data = self._post("/completions", payload)
                lps = data["choices"][0]["logprobs"]["token_logprobs"]
            except (_HTTPStatus, KeyError, TypeError):
                raise self._unsupported() from None
            return float(sum(lps[len(pids) : len(pids) + len(cids)]))

        flat = self._map(one, jobs)
        out, k = [], 0
        for conts in continuations:
            out.append(flat[k : k + len(conts)])
            k += len(conts)
        return out

    def close(self) -> None:
        self.client.close()


class _HTTPStatus(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message
