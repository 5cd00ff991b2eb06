"""Offline preference optimisation with TRL ``DPOTrainer`` on AI-labelled pairs.

DPO takes hard pairs. Soft labels are used in two ways: pairs whose label is within ``min_confidence`` of 0.5
are dropped (the labeller could not tell them apart), and ``label_smoothing`` (conservative DPO, cDPO) lets the
loss assume a fraction of labels are flipped; ``auto`` sets it to the mean uncertainty 1 - p_chosen of the kept
pairs, so the loss matches the soft labels on average.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from cai.base_config import Strict
from cai.errors import UserError
from cai.training.common import (
    TrainResult,
    load_trainable,
    lora_config,
    preference_columns,
    train_and_save,
    trl_args,
    write_cards,
)
from cai.training.curves import step_logger

if TYPE_CHECKING:
    from cai.tracking import StageTracking


class DPOTrainConfig(Strict):
    """DPO settings (LoRA on the SL model)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: run all epochs)")
    learning_rate: float = Field(5e-5, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL to the SL model")
    max_length: int = Field(512, ge=16)
    min_confidence: float = Field(0.05, ge=0, lt=0.5, description="drop pairs with |p_chosen - 0.5| below this")
    label_smoothing: float | Literal["auto"] = Field("auto", description="cDPO smoothing; auto = mean(1 - p_chosen)")
    lora: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)


def confident_pairs(pairs: Sequence[dict], min_confidence: float) -> tuple[list[dict], int]:
    """Orient every pair so chosen is preferred and drop near-0.5 ones; returns (kept, dropped)."""
    kept = []
    for r in pairs:
        p = float(r.get("p_chosen", 1.0))
        if abs(p - 0.5) < min_confidence:
            continue
        if p < 0.5:
            r = {**r, "chosen": r["rejected"], "rejected": r["chosen"], "p_chosen": 1 - p}
        kept.append(r)
    return kept, len(pairs) - len(kept)


def train_dpo(
    base_spec: str,
    pairs: Sequence[dict],
    output_dir: Path,
    settings: DPOTrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    tracking: StageTracking | None = None,
) -> TrainResult:
    """DPO on ``pairs`` (prompt, chosen, rejected[, p_chosen]); writes steps.csv, curves.png, adapter/ and model/
    with their model cards. ``tracking`` names the trackers the trainer reports to."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from cai.model_card import CardFacts
    from cai.tracking import trainer_callbacks

    kept, dropped = confident_pairs(pairs, settings.min_confidence)
    if not kept:
        raise UserError(
            f"dpo: all {len(pairs)} pairs have labels within {settings.min_confidence} of 0.5; lower "
            "dpo.min_confidence or use a stronger feedback model"
        )
    smoothing = settings.label_smoothing
    if smoothing == "auto":
        smoothing = min(0.49, sum(1 - float(r.get("p_chosen", 1.0)) for r in kept) / len(kept))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_trainable(base_spec, seed=seed)
    data = Dataset.from_dict(preference_columns(kept))
    args = DPOConfig(
        **trl_args(output_dir / "checkpoints", seed=seed, progress=progress, tracking=tracking),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        beta=settings.beta,
        label_smoothing=smoothing,
        max_length=settings.max_length,
        save_strategy="epoch",
        save_total_limit=1,
    )
    steps_csv = output_dir / "steps.csv"
    logger = step_logger(
        steps_csv,
        {
            "loss": "loss",
            "reward_margin": "rewards/margins",
            "reward_accuracy": "rewards/accuracies",
            "reward_chosen": "rewards/chosen",
            "reward_rejected": "rewards/rejected",
        },
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tok,
        callbacks=[logger, *trainer_callbacks(tracking)],
        peft_config=lora_config(settings) if settings.lora else None,
    )
    adapter = train_and_save(
        trainer,
        tok,
        output_dir,
        adapter=settings.lora,
        curves=(
            steps_csv,
            ["loss", "reward_margin", "reward_accuracy"],
            "DPO on AI-feedback pairs (implicit reward = beta * log-ratio to the SL " "model)",
        ),
    )
    metrics = {
        "pairs": len(kept),
        "dropped_uncertain": dropped,
        "label_smoothing": smoothing,
        "steps": trainer.state.global_step,
    }
    result = TrainResult(output_dir, adapter, output_dir / "model", metrics)
    data = {"preference pairs trained on": len(kept), "dropped as uncertain": dropped}
    card_metrics = {"steps": metrics["steps"], "label_smoothing": smoothing}
    write_cards(
        result, CardFacts("dpo", str(base_spec), settings=settings.model_dump(), data=data, metrics=card_metrics)
    )
    return result
