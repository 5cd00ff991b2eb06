"""Stage ``classify``: which principles each red-team prompt probes (:mod:`cai.classify`), scored by the feedback
model; writes ``data.jsonl`` (id, prompt, category, principles: the top-k ``{name, p}``)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cai.base_config import Strict
from cai.classify import classify_prompts, summarize, top_principles
from cai.stages.artifacts import read_prompts, run_constitution

CHUNK = 16


class ClassifyConfig(Strict):
    """Config section ``classify``."""

    top_k: int = Field(3, ge=1, description="principles kept per prompt")
    calibrate: bool = Field(True, description="subtract each label's log-prob after a content-free request")


def run(ctx) -> dict[str, Any]:
    from tqdm.auto import tqdm

    cfg = ctx.config
    section: ClassifyConfig = cfg.classify
    constitution = run_constitution(cfg)
    names = [p.name for p in constitution.principles]
    labels = [p.label for p in constitution.principles]
    prompts = read_prompts(ctx.run, "prompts")
    backend = ctx.pool.feedback()
    with ctx.stage.writer() as w:
        todo = [p for p in prompts if p.id not in w]
        bar = tqdm(
            total=len(prompts),
            initial=len(prompts) - len(todo),
            desc="classify",
            unit="prompt",
            disable=not ctx.progress,
        )
        for k in range(0, len(todo), CHUNK):
            part = todo[k : k + CHUNK]
            probs = classify_prompts(backend, [p.prompt for p in part], labels, calibrate=section.calibrate)
            for p, row in zip(part, probs, strict=False):
                w.write(
                    {
                        "id": p.id,
                        "prompt": p.prompt,
                        "category": p.category,
                        "principles": top_principles(names, row, section.top_k),
                    }
                )
            bar.update(len(part))
        bar.close()
        records = list(w.records)
    counts = summarize(records, constitution)
    ctx.stage.finish(counts, feedback_model=backend.spec)
    return {k: v for k, v in counts.items() if not isinstance(v, dict)}
