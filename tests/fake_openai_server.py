"""A small vLLM-like OpenAI-compatible server over an in-process HF backend, for loopback tests only."""

from __future__ import annotations

import socket
import threading
import time

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
        sp = SamplingParams(body.get("max_tokens", 16), body.get("temperature", 0.0), body.get("top_p", 1.0),
                            body.get("stop") or [], body.get("seed"))
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
