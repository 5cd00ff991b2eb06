"""Stage ``prompts``: load the red-team and benign prompt sets into the run (prompts.jsonl, benign.jsonl)."""

from __future__ import annotations

from typing import Any

from cai.base_config import PromptSourceConfig
from cai.data import PromptSet, load_prompts
from cai.errors import UserError


def load_source(cfg: PromptSourceConfig, what: str) -> PromptSet:
    ps = load_prompts(cfg.source, cfg.field, split=cfg.split, limit=cfg.limit)
    if len(ps) == 0:
        raise UserError(
            f"{what} prompt set {cfg.source!r} has no prompts for split={cfg.split!r}; "
            f"set {what}.split to null or another split"
        )
    return ps


def run(ctx) -> dict[str, Any]:
    cfg = ctx.config
    counts: dict[str, Any] = {}
    sets = [("prompts", cfg.prompts)] + ([("benign", cfg.benign)] if cfg.benign else [])
    for name, source in sets:
        ps = load_source(source, name)
        with ctx.stage.writer(f"{name}.jsonl") as w:
            for p in ps:
                w.write(p.to_dict())
        for s in ps.skipped:
            ctx.stage.skip(f"{name}:{s.get('line', '?')}", s.get("reason", "skipped"))
        counts[name] = len(ps)
        counts[f"{name}_skipped"] = len(ps.skipped)
        by_cat: dict[str, int] = {}
        for p in ps:
            by_cat[p.category] = by_cat.get(p.category, 0) + 1
        counts[f"{name}_by_category"] = by_cat
    ctx.stage.finish(counts)
    return {k: v for k, v in counts.items() if not k.endswith("by_category")}
