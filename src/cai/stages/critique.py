"""Stage ``critique``: SL-CAI's critique → revision rounds (:mod:`cai.critique`) over the run's red-team prompts,
with principles drawn from the classify stage's probabilities when it ran, else from the prompts' categories.

Outputs: ``steps.jsonl`` (every phase's generations, for resuming), ``data.jsonl`` (id, prompt, initial, rounds,
final, changed, messages), ``data.csv`` and ``sft.jsonl`` (the revisions plus helpfulness records: policy answers
to benign prompts).
"""

from __future__ import annotations

import random
import time
from typing import Any

from pydantic import Field

from cai.base_config import Strict
from cai.critique import before_after, critique_and_revise, principle_table, principle_weights, sft_records, summarize
from cai.errors import UserError
from cai.runs import write_csv
from cai.stages.artifacts import principle_probabilities, read_prompts, run_constitution
from cai.tracking import Tracker

CSV_COLUMNS = ("id", "category", "prompt", "principles", "initial", "critique", "final", "changed", "length_ratio")


class CritiqueConfig(Strict):
    """Config section ``critique``."""

    rounds: int = Field(1, ge=1, le=4, description="critique→revision rounds per item")
    few_shot: int | None = Field(None, ge=0, description="demonstrations shown (null: all of the constitution's)")
    critique_max_new_tokens: int = Field(64, ge=1)
    revision_max_new_tokens: int | None = Field(None, ge=1, description="null: generation.max_new_tokens")
    principles: list[str] | None = Field(None, description="sample only these principles (null: all)")
    helpful_ratio: float = Field(0.25, ge=0, description="helpfulness (benign) SFT records per revision record")
    keep_unchanged: bool = Field(True, description="train on revisions identical to what they revised")
    system_prompt: bool = Field(
        False, description="give the policy the constitution's system prompt for its first answer"
    )
    show_samples: int = Field(3, ge=0, description="before/after samples printed and kept in the manifest")


def run(ctx) -> dict[str, Any]:
    from cai.evaluation.report import print_critique_samples

    cfg, section = ctx.config, ctx.config.critique
    t0 = time.time()
    constitution = run_constitution(cfg)
    prompts = read_prompts(ctx.run, "prompts")
    weights, source = _principle_weights(ctx, constitution, prompts)
    helpful = _helpful_prompts(ctx, len(prompts))
    with ctx.stage.writer("steps.jsonl") as steps:
        got = critique_and_revise(
            ctx.pool.policy(),
            ctx.pool.feedback(),
            prompts,
            constitution,
            weights,
            steps,
            ctx.stage,
            sampling=cfg.generation.sampling(cfg.seed),
            rounds=section.rounds,
            few_shot=section.few_shot,
            critique_max_new_tokens=section.critique_max_new_tokens,
            revision_max_new_tokens=section.revision_max_new_tokens or cfg.generation.max_new_tokens,
            system_prompt=constitution.system_prompt if section.system_prompt else None,
            helpful=helpful,
            progress=ctx.progress,
        )
    with ctx.stage.writer("data.jsonl") as w:
        for it in got.items:
            w.write(it)
    with ctx.stage.writer("sft.jsonl") as sft:
        for r in sft_records(got.items, helpful, got.helpful_answers, keep_unchanged=section.keep_unchanged):
            sft.write(r)
    write_csv(ctx.stage.file("data.csv"), [_csv_row(it) for it in got.items], CSV_COLUMNS)
    counts = summarize(got.items, section.rounds, len(got.helpful_answers), time.time() - t0)
    counts["principles_from"] = source
    counts["sft_records"] = len(sft.records)  # with those of an earlier attempt
    samples = before_after(got.items, section.show_samples)
    ctx.stage.finish(counts, samples=samples, feedback_model=cfg.models.feedback_spec)
    with Tracker(ctx.tracking) as tracker:
        tracker.log(counts)
    if ctx.progress:
        print_critique_samples(counts, samples)
    return {k: v for k, v in counts.items() if not isinstance(v, (dict, list))}


def _principle_weights(ctx, constitution, prompts) -> tuple[dict[str, dict[str, float]], str]:
    """Per prompt id, sampling weights over the allowed principles (``critique.principles``, else all), and where
    they came from; a configured principle that is unknown or that no prompt probes is a config error."""
    chosen = ctx.config.critique.principles
    allowed = chosen or [p.name for p in constitution.principles]
    known = {p.name for p in constitution.principles}
    for name in allowed:
        if name not in known:
            raise UserError(
                f"config field critique.principles: unknown principle {name!r} in constitution "
                f"{constitution.name!r} (known: {', '.join(sorted(known))})"
            )
    probabilities = principle_probabilities(ctx.run)
    source = "classify" if probabilities is not None else "prompt categories"
    table = principle_table(prompts, constitution, probabilities)
    if chosen:
        for name in allowed:
            if not any(name in table.get(p.id, {}) for p in prompts):
                raise UserError(
                    f"config field critique.principles: no prompt in {ctx.config.prompts.source!r} "
                    f"probes principle {name!r} (by {source}); add prompts for it or drop it"
                )
    return principle_weights(prompts, table, allowed), source


def _helpful_prompts(ctx, n_redteam: int) -> list:
    """The benign prompts whose policy answers are mixed into SFT (``helpful_ratio`` per revision)."""
    n = round(ctx.config.critique.helpful_ratio * n_redteam)
    if n == 0:
        return []
    if not ctx.config.benign:
        raise UserError("config field critique.helpful_ratio > 0 needs a 'benign' prompt set; add one or set it to 0")
    benign = read_prompts(ctx.run, "benign")
    random.Random(ctx.config.seed).shuffle(benign)
    if len(benign) < n:
        ctx.stage.skip("helpful", f"only {len(benign)} benign prompts for {n} helpfulness records")
    return benign[:n]


def _csv_row(item: dict) -> dict:
    """A data.jsonl record as a spreadsheet row: the principles of its rounds joined, its last critique."""
    return {
        **item,
        "principles": ";".join(r["principle"] for r in item["rounds"]),
        "critique": item["rounds"][-1]["critique"] if item["rounds"] else "",
    }
