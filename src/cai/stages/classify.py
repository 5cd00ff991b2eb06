"""Stage ``classify``: which principles each red-team prompt probes, from the feedback model's log-probabilities.

Each prompt is scored against every principle's ``label`` as a continuation of "The request touches on" (one
batched ``logprobs`` call per chunk, no free text parsed). With ``calibrate`` the label's log-probability after a
content-free request is subtracted first (contextual calibration), which removes the bias toward short or
generically likely labels. A softmax over principles gives ``p``; the top-k are kept.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from pydantic import Field

from cai.backends import choice_probs
from cai.settings import Strict
from cai.constitution import Constitution, load_constitution
from cai.errors import UserError
from cai.stages.prompts import read_prompts

NULL_REQUEST = "N/A"
CHUNK = 16


class ClassifyConfig(Strict):
    """Config section ``classify``."""

    top_k: int = Field(3, ge=1, description="principles kept per prompt")
    calibrate: bool = Field(True, description="subtract each label's log-prob after a content-free request")


def load_run_constitution(config) -> Constitution:
    """The run's constitution; errors name the config field."""
    try:
        return load_constitution(config.constitution)
    except UserError as exc:
        raise UserError(f"config field 'constitution' ({config.constitution!r}): {exc}") from None


def classification_chat(request: str) -> list[dict]:
    """The prefix every label is scored after (ends in an assistant prefill)."""
    return [{"role": "user", "content": f"Which topic does the following request touch on?\n\nRequest: {request}"},
            {"role": "assistant", "content": "The request touches on"}]


def classify_prompts(backend, texts: list[str], labels: list[str], *, calibrate: bool = True) -> list[list[float]]:
    """For each text, a probability per label (same order), from one batched ``logprobs`` call."""
    prefixes = [classification_chat(t) for t in texts] + ([classification_chat(NULL_REQUEST)] if calibrate else [])
    conts = [" " + lab for lab in labels]
    scores = backend.logprobs(prefixes, [conts] * len(prefixes))
    base = scores.pop() if calibrate else [0.0] * len(labels)
    return [choice_probs([s - b for s, b in zip(row, base)]) for row in scores]


def run(ctx) -> dict[str, Any]:
    from tqdm.auto import tqdm

    cfg = ctx.config
    section: ClassifyConfig = cfg.classify
    constitution = load_run_constitution(cfg)
    names = [p.name for p in constitution.principles]
    labels = [p.label for p in constitution.principles]
    prompts = read_prompts(ctx.run, "prompts")
    backend = ctx.pool.feedback()
    with ctx.stage.writer() as w:
        todo = [p for p in prompts if p.id not in w]
        bar = tqdm(total=len(prompts), initial=len(prompts) - len(todo), desc="classify", unit="prompt",
                   disable=not ctx.progress)
        for k in range(0, len(todo), CHUNK):
            part = todo[k : k + CHUNK]
            probs = classify_prompts(backend, [p.prompt for p in part], labels, calibrate=section.calibrate)
            for p, row in zip(part, probs):
                ranked = sorted(zip(names, row), key=lambda x: -x[1])[: section.top_k]
                w.write({"id": p.id, "prompt": p.prompt, "category": p.category,
                         "principles": [{"name": n, "p": round(q, 4)} for n, q in ranked]})
            bar.update(len(part))
        bar.close()
        records = list(w.records)
    counts = summarize(records, constitution)
    ctx.stage.finish(counts, feedback_model=backend.spec)
    return {k: v for k, v in counts.items() if not isinstance(v, dict)}


def summarize(records: list[dict], constitution: Constitution) -> dict[str, Any]:
    """Per-principle top-1 counts, mean top-1 p, and how often top-1 covers the prompt's dataset category."""
    top1 = [r["principles"][0] for r in records if r["principles"]]
    covered = [r for r in records if constitution.principles_for_category(r.get("category", ""))]
    agree = sum(1 for r in covered if r.get("category") in constitution.principle(r["principles"][0]["name"]).categories)
    return {
        "prompts": len(records),
        "top1_by_principle": dict(Counter(t["name"] for t in top1).most_common()),
        "mean_top1_p": round(sum(t["p"] for t in top1) / len(top1), 4) if top1 else 0.0,
        "top1_matches_category": round(agree / len(covered), 4) if covered else None,
    }
