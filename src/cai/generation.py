"""Generate responses for a prompt set into an append-only JSONL, resumably and in flushed chunks."""

from __future__ import annotations

import time
from collections.abc import Sequence

from cai.backends import Backend, SamplingParams
from cai.data import Prompt
from cai.runs import JsonlWriter, StageDir


def chat_for(prompt: str, system_prompt: str | None = None, prefill: str | None = None) -> list[dict]:
    """The conversation a prompt becomes: optional system prompt, the user turn, optional assistant prefill."""
    chat = [{"role": "system", "content": system_prompt}] if system_prompt else []
    chat.append({"role": "user", "content": prompt})
    if prefill:
        chat.append({"role": "assistant", "content": prefill})
    return chat


def generate_responses(
    backend: Backend,
    prompts: Sequence[Prompt],
    writer: JsonlWriter,
    sampling: SamplingParams,
    *,
    stage: StageDir | None = None,
    system_prompt: str | None = None,
    chunk: int = 32,
    progress: bool = True,
    extra: dict | None = None,
) -> dict[str, float]:
    """Answer every prompt not yet in ``writer``; each chunk is written and flushed before the next starts, so a
    kill loses at most one chunk of work. Returns counts and throughput."""
    from tqdm.auto import tqdm

    from cai.errors import UserError

    context = getattr(backend, "max_context", None)
    if isinstance(context, int) and sampling.max_new_tokens >= context:
        raise UserError(
            f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in the context of "
            f"{backend.spec!r} ({context} tokens); ask for fewer new tokens"
        )
    todo = [p for p in prompts if p.id not in writer]
    done_before = len(prompts) - len(todo)
    t0, new_tokens, errors = time.time(), 0, 0
    bar = tqdm(total=len(prompts), initial=done_before, desc="generate", unit="prompt", disable=not progress)
    for k in range(0, len(todo), chunk):
        part = todo[k : k + chunk]
        seed = None if sampling.seed is None else sampling.seed + k
        params = SamplingParams(**{**sampling.__dict__, "seed": seed})
        outs = backend.generate([chat_for(p.prompt, system_prompt) for p in part], params)
        for p, g in zip(part, outs, strict=False):
            if g.finish_reason == "error":
                errors += 1
                if stage is not None:
                    stage.skip(p.id, f"prompt has {g.prompt_tokens} tokens, too long for the model's context")
                continue
            new_tokens += g.completion_tokens
            writer.write(
                {
                    "id": p.id,
                    "prompt": p.prompt,
                    "category": p.category,
                    "split": p.split,
                    "response": g.text,
                    "finish_reason": g.finish_reason,
                    "prompt_tokens": g.prompt_tokens,
                    "completion_tokens": g.completion_tokens,
                    "model": backend.spec,
                    **(extra or {}),
                }
            )
        bar.update(len(part))
        if stage is not None:
            stage.save()
    bar.close()
    secs = time.time() - t0
    return {
        "generated": len(todo) - errors,
        "already_done": done_before,
        "errors": errors,
        "new_tokens": new_tokens,
        "seconds": round(secs, 2),
        "tokens_per_s": round(new_tokens / secs, 2) if secs > 0 and new_tokens else 0.0,
    }
