"""The prompts an experiment trains and evaluates on: harmful (red-team) and benign pools, split into training
and held-out evaluation prompts."""

from __future__ import annotations

from pydantic import Field

from cai.base_config import PromptSourceConfig, Strict
from cai.data import Prompt, load_prompts
from cai.errors import UserError


class PromptPoolConfig(Strict):
    """Harmful (red-team) and benign prompts, split into training and held-out evaluation prompts."""

    harmful: PromptSourceConfig = Field(default_factory=lambda: PromptSourceConfig(source="redteam", split=None))
    benign: PromptSourceConfig = Field(default_factory=lambda: PromptSourceConfig(source="benign", split=None))
    train_split: str = "train"
    eval_split: str = "eval"
    n_train_harmful: int = Field(48, ge=1, description="harmful training prompts used")
    n_train_benign: int = Field(48, ge=1, description="benign training prompts used")
    n_eval_harmful: int = Field(35, ge=1, description="held-out harmful prompts evaluated")
    n_eval_benign: int = Field(20, ge=1, description="held-out benign prompts evaluated")


def _take(source: PromptSourceConfig, split: str, n: int, what: str) -> list[Prompt]:
    ps = load_prompts(source.source, source.field)
    kept = [p for p in ps if p.split == split] or (list(ps) if split == "train" else [])
    if not kept:
        raise UserError(
            f"prompts.{what}: {source.source!r} has no prompts with split {split!r}; "
            "set prompts.train_split / prompts.eval_split"
        )
    return kept[: min(n, source.limit or n)]


def prompt_pools(cfg: PromptPoolConfig) -> dict[str, list[Prompt]]:
    """``train_harmful``, ``train_benign``, ``eval_harmful``, ``eval_benign`` (held out: the eval split)."""
    return {
        "train_harmful": _take(cfg.harmful, cfg.train_split, cfg.n_train_harmful, "harmful"),
        "train_benign": _take(cfg.benign, cfg.train_split, cfg.n_train_benign, "benign"),
        "eval_harmful": _take(cfg.harmful, cfg.eval_split, cfg.n_eval_harmful, "harmful"),
        "eval_benign": _take(cfg.benign, cfg.eval_split, cfg.n_eval_benign, "benign"),
    }


def spare_prompts(cfg: PromptPoolConfig, n: int) -> dict[str, list[Prompt]]:
    """Up to ``n`` harmful and ``n`` benign training-split prompts that ``prompt_pools`` does not use: fresh prompts
    for red-teaming a model that was trained on the pools."""
    return {
        "harmful": _take(cfg.harmful, cfg.train_split, cfg.n_train_harmful + n, "harmful")[cfg.n_train_harmful :],
        "benign": _take(cfg.benign, cfg.train_split, cfg.n_train_benign + n, "benign")[cfg.n_train_benign :],
    }
