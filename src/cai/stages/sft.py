"""Stage ``sft``: fine-tune the policy on the critique stage's ``sft.jsonl`` (revisions + helpfulness records).

Writes ``sft/adapter/``, ``sft/merged/`` (the SL-CAI model, a plain HF folder), checkpoints, the loss curve and
metrics. A kill resumes from the newest checkpoint.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cai.runs import read_jsonl
from cai.stages.model_cards import write_run_model_cards
from cai.training.sft import SFTTrainConfig, train_sft


class SFTStageConfig(SFTTrainConfig):
    """Config section ``sft``: the training settings plus which model to start from."""

    base: str | None = Field(None, description="model spec to fine-tune (null: models.policy)")


def run(ctx) -> dict[str, Any]:
    cfg = ctx.config
    section: SFTStageConfig = cfg.sft
    records = read_jsonl(ctx.run.artifact("critique", "sft.jsonl"))
    ctx.pool.release()  # free the generation models before training
    settings = SFTTrainConfig(**section.model_dump(exclude={"base"}))
    result = train_sft(
        section.base or cfg.models.policy,
        records,
        ctx.stage.path,
        settings,
        seed=cfg.seed,
        progress=ctx.progress,
        tracking=ctx.tracking,
    )
    ctx.stage.finish(
        {"records": len(records), **result.metrics},
        merged_dir=str(result.merged_dir),
        adapter_dir=str(result.adapter_dir) if result.adapter_dir else None,
    )
    write_run_model_cards(ctx.run, cfg)
    return {k: v for k, v in result.metrics.items() if k in ("steps", "train_loss", "eval_loss", "method", "loss_on")}
