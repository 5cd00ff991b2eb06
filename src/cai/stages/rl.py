"""Stage ``rl``: online RL (TRL GRPO or RLOO) of the SL model against the run's reward model, or (``rl.reward: rules``)
against the rules labeler's utility.

Writes steps.csv (reward mean/std, KL, response length, loss per step), rewards.csv (every completion's reward; the
paired first-vs-last-pass trend in the manifest's ``reward_paired`` reads it), samples.csv (prompt, response, reward),
curves.png (reward and KL against step), adapter/ and model/ (the final policy); resumes from checkpoints/.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cai.stages.artifacts import read_prompts, sl_model_spec
from cai.stages.model_cards import write_run_model_cards
from cai.training.rl import RLTrainConfig


class RLStageConfig(RLTrainConfig):
    """The ``rl`` section: RL settings plus which prompts the policy practises on."""

    prompt_limit: int | None = Field(16, ge=1, description="red-team train prompts used (null: all)")
    benign_limit: int | None = Field(8, ge=0, description="benign prompts mixed in so helpfulness is rewarded too")


def run(ctx) -> dict[str, Any]:
    from cai.training.common import is_main_process
    from cai.training.rl import train_rl

    cfg: RLStageConfig = ctx.config.rl
    prompts = [p.prompt for p in read_prompts(ctx.run)[: cfg.prompt_limit]]
    groups = dict.fromkeys(prompts, "harmful")
    if ctx.config.benign is not None and cfg.benign_limit != 0:
        benign = [p.prompt for p in read_prompts(ctx.run, "benign")[: cfg.benign_limit]]
        prompts += benign
        groups.update(dict.fromkeys(benign, "benign"))
    if cfg.reward == "rules":  # the constitution's wanted behaviour, graded offline: no reward model is read
        from cai.stages.artifacts import run_constitution
        from cai.training.rl import RulesReward

        known = {p: g == "harmful" for p, g in groups.items()} if cfg.reward_harm == "prompt_set" else None
        reward: Any = RulesReward(run_constitution(ctx.config), harmful=known, utility=cfg.rules_utility)
    else:
        reward = ctx.run.artifact("reward", "model")
    base = sl_model_spec(ctx.run, ctx.config)
    ctx.pool.release()
    result = train_rl(
        base,
        prompts,
        reward,
        ctx.stage.path,
        cfg,
        seed=ctx.config.seed,
        progress=ctx.progress,
        tracking=ctx.tracking,
        prompt_groups=groups,
    )
    if not is_main_process():
        return {}
    t = result.metrics["reward_trend"]
    counts = {
        "prompts": len(prompts),
        "steps": result.metrics["steps"],
        "reward_first": t.get("first"),
        "reward_last": t.get("last"),
        "reward_delta_halves": t.get("delta"),
        "reward_paired": result.metrics["reward_paired"],  # same prompts, first vs last pass (reward_trend.py)
        "kl_last": result.metrics["kl_last"],
    }
    ctx.stage.finish(counts, base_model=base)
    write_run_model_cards(ctx.run, ctx.config)
    return counts
