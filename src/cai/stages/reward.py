"""Stage ``reward``: a reward model trained on the preference pairs' soft labels (cai.training.reward).

Writes model/ (a sequence-classification folder, num_labels=1), metrics.json (held-out accuracy with a 95% CI,
soft-label cross-entropy, ECE and a reliability table), log_history.json; resumes from checkpoints/.
"""

from __future__ import annotations

from typing import Any

from cai.runs import read_jsonl, write_json
from cai.stages.artifacts import sl_model_spec
from cai.stages.model_cards import write_run_model_cards


def run(ctx) -> dict[str, Any]:
    from cai.training.common import is_main_process
    from cai.training.reward import train_reward

    rows = read_jsonl(ctx.run.artifact("preferences"))
    base = sl_model_spec(ctx.run, ctx.config)
    ctx.pool.release()
    metrics = train_reward(
        base,
        rows,
        ctx.stage.path,
        ctx.config.reward,
        seed=ctx.config.seed,
        progress=ctx.progress,
        tracking=ctx.tracking,
    ).metrics
    if not is_main_process():
        return {}
    metrics["base_model"] = base
    write_json(ctx.stage.file("metrics.json"), metrics)
    acc = metrics.get("heldout_accuracy") or {}
    counts = {
        "train_pairs": metrics["train_pairs"],
        "heldout_pairs": metrics["heldout_pairs"],
        "heldout_accuracy": acc.get("rate"),
        "heldout_ece": metrics.get("heldout_ece"),
    }
    ctx.stage.finish(counts)
    write_run_model_cards(ctx.run, ctx.config)
    return counts
