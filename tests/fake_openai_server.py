"""Small vLLM-like OpenAI-compatible servers for loopback tests only: one over an in-process HF backend
(``make_app``), one without a model whose log-probabilities are scripted (``make_scripted_app``)."""

from __future__ import annotations

import re
import socket
import threading
import time
from typing import Callable

import uvicorn
from fastapi import FastAPI, HTTPException, Request


def make_app(backend, *, with_tokenize: bool = True, fail_first: int = 0) -> FastAPI:
    import torch

    from cai.backends import SamplingParams

    app = FastAPI()
    state = {"calls": 0}
    tok = backend.tokenizer

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        body = await req.json()
        state["calls"] += 1
        if state["calls"] <= fail_first:
            raise HTTPException(503, "warming up")
        msgs = body["messages"]
        sp = SamplingParams(max_new_tokens=body.get("max_tokens", 16), temperature=body.get("temperature", 0.0),
                            top_p=body.get("top_p", 1.0), stop=body.get("stop") or [], seed=body.get("seed"))
        g = backend.generate([msgs], sp)[0]
        return {"choices": [{"message": {"role": "assistant", "content": g.text}, "finish_reason": g.finish_reason}],
                "usage": {"prompt_tokens": g.prompt_tokens, "completion_tokens": g.completion_tokens}}

    if with_tokenize:
        @app.post("/tokenize")
        async def tokenize(req: Request):
            body = await req.json()
            if "messages" in body:
                text = backend.render(body["messages"])
            else:
                text = body["prompt"]
            return {"tokens": tok(text, add_special_tokens=False)["input_ids"]}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        ids = body["prompt"]
        if not (isinstance(ids, list) and body.get("echo")):
            raise HTTPException(400, "only echo with token ids is supported here")
        x = torch.tensor([ids])
        with torch.inference_mode():
            logp = torch.log_softmax(backend.model(input_ids=x).logits[0].float(), -1)
        lps = [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))] + [0.0]
        return {"choices": [{"text": "", "logprobs": {"token_logprobs": lps}}]}

    return app


class ServerThread:
    """Run an ASGI app on a free loopback port in a background thread."""

    def __init__(self, app):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


# ---- a model-free server with scripted log-probabilities -------------------------------------------------------------
_PIECE = re.compile(r"\s*\S+|\s+$")


def render_chat(messages: list[dict], *, add_generation_prompt: bool = True, continue_final_message: bool = False) -> str:
    """The scripted server's chat template: ``<|role|>\\ncontent\\n`` per message; with ``continue_final_message``
    the last message stays open (no newline), as vLLM's /tokenize does for a prefilled assistant turn."""
    parts = [f"<|{m['role']}|>\n{m['content']}" + ("" if continue_final_message and i == len(messages) - 1 else "\n")
             for i, m in enumerate(messages)]
    return "".join(parts) + ("<|assistant|>\n" if add_generation_prompt and not continue_final_message else "")


def make_scripted_app(score: Callable[[str, str], float], *, reply: Callable[[list[dict]], str] | None = None
                      ) -> FastAPI:
    """A vLLM-like OpenAI-compatible server without a model, for exact tests of what clients do with it.

    Tokens are whitespace-led words (``" Yes"``, ``"\\nAnswer:"``) with ids from a vocabulary that grows as text
    is tokenized; ``/v1/completions`` with ``echo`` gives token *i* the log-probability ``score(text before it,
    token text)``; ``/v1/chat/completions`` answers ``reply(messages)``. ``app.state.calls`` counts requests
    per endpoint."""
    app = FastAPI()
    vocab: dict[str, int] = {}
    pieces: list[str] = []
    calls: dict[str, int] = {"tokenize": 0, "completions": 0, "chat": 0}
    app.state.calls = calls

    def encode(text: str) -> list[int]:
        ids = []
        for piece in _PIECE.findall(text):
            if piece not in vocab:
                vocab[piece] = len(pieces)
                pieces.append(piece)
            ids.append(vocab[piece])
        return ids

    @app.post("/tokenize")
    async def tokenize(req: Request):
        body = await req.json()
        calls["tokenize"] += 1
        if "messages" in body:
            if body.get("add_generation_prompt", True) and body.get("continue_final_message"):
                raise HTTPException(400, "add_generation_prompt and continue_final_message are exclusive")
            text = render_chat(body["messages"], add_generation_prompt=body.get("add_generation_prompt", True),
                               continue_final_message=body.get("continue_final_message", False))
        else:
            text = body["prompt"]
        return {"tokens": encode(text), "count": len(encode(text))}

    @app.post("/v1/completions")
    async def completions(req: Request):
        body = await req.json()
        calls["completions"] += 1
        ids = body["prompt"]
        if not (isinstance(ids, list) and body.get("echo") and body.get("logprobs") is not None):
            raise HTTPException(400, "only echo + logprobs with token ids is supported here")
        text = [pieces[i] for i in ids]
        lps = [None] + [float(score("".join(text[:i]), text[i])) for i in range(1, len(ids))] + [0.0]
        return {"choices": [{"text": "", "logprobs": {"token_logprobs": lps, "tokens": text + [""]}}]}

    @app.post("/v1/chat/completions")
    async def chat(req: Request):
        body = await req.json()
        calls["chat"] += 1
        text = reply(body["messages"]) if reply else ""
        return {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(encode(render_chat(body["messages"]))),
                          "completion_tokens": len(encode(text))}}

    return app
