"""Stage ``dpo``: offline DPO of the SL model on the preference pairs (cai.training.dpo), the alternative
to ``reward`` + ``rl``. Writes steps.csv, curves.png, adapter/ and model/; resumes from checkpoints/."""

from __future__ import annotations

from typing import Any

from cai.runs import read_jsonl
from cai.stages.artifacts import sl_model_spec
from cai.stages.model_cards import write_run_model_cards


def run(ctx) -> dict[str, Any]:
    from cai.training.common import is_main_process
    from cai.training.dpo import train_dpo

    rows = read_jsonl(ctx.run.artifact("preferences"))
    base = sl_model_spec(ctx.run, ctx.config)
    ctx.pool.release()
    result = train_dpo(
        base, rows, ctx.stage.path, ctx.config.dpo, seed=ctx.config.seed, progress=ctx.progress, tracking=ctx.tracking
    )
    if not is_main_process():
        return {}
    counts = dict(result.metrics)
    ctx.stage.finish(counts, base_model=base)
    write_run_model_cards(ctx.run, ctx.config)
    return counts
