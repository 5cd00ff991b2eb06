"""Stage ``generate``: the policy's answers to the run's prompts (the base model's behaviour before training)."""

from __future__ import annotations

from typing import Any

from cai.generation import generate_responses
from cai.stages.artifacts import read_prompts


def run(ctx) -> dict[str, Any]:
    cfg = ctx.config
    prompts = read_prompts(ctx.run, "prompts")
    backend = ctx.pool.policy()
    with ctx.stage.writer("responses.jsonl") as w:
        stats = generate_responses(
            backend,
            prompts,
            w,
            cfg.generation.sampling(cfg.seed),
            stage=ctx.stage,
            chunk=max(cfg.models.batch_size, 8),
            progress=ctx.progress,
        )
        total = len(w.done)
    ctx.stage.finish({"responses": total, **stats})
    return {"responses": total, "tokens_per_s": stats["tokens_per_s"], "errors": stats["errors"]}
