"""Reward model: TRL ``RewardTrainer`` with a scalar head, trained on *soft* AI-feedback labels.

TRL's RewardTrainer fits hard (chosen, rejected) pairs with -log σ(r_c - r_r). AI labels are probabilities, so
``SoftLabelRewardTrainer`` overrides ``compute_loss`` with the cross-entropy against p = p_chosen:
``-(p log σ(r_c - r_r) + (1 - p) log σ(r_r - r_c))``; with p = 1 it is TRL's loss. The saved model is a plain
``AutoModelForSequenceClassification`` folder (num_labels=1, LoRA merged); ``load_reward_model`` scores
(prompt, response) pairs in [0, 1] as the sigmoid of the scalar head.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from cai.tracking import StageTracking


class RewardTrainConfig(Strict):
    """Reward-model training settings (LoRA on the SL model by default)."""

    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16)
    lora: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="held-out share of pairs for accuracy/calibration")
    max_steps: int = Field(-1, description="stop after this many optimizer steps (-1: run all epochs)")
    calibration_bins: int = Field(5, ge=1)


def chat_text(tokenizer, prompt: str, response: str) -> str:
    """The text the reward model reads: the conversation rendered with the chat template (TRL does the same)."""
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )


def soft_preference_loss(r_chosen, r_rejected, p):
    """Cross-entropy of the Bradley-Terry probability σ(r_c - r_r) against soft labels p (tensors)."""
    from torch.nn.functional import logsigmoid

    d = r_chosen - r_rejected
    return -(p * logsigmoid(d) + (1 - p) * logsigmoid(-d)).mean()


def _soft_trainer_cls():
    """Build the RewardTrainer subclass lazily (keeps ``import cai`` free of torch/TRL)."""
    import torch
    from trl import RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class SoftLabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            out["p_chosen"] = torch.tensor([float(e["p_chosen"]) for e in examples], dtype=torch.float)
            return out

    class SoftLabelRewardTrainer(RewardTrainer):
        """RewardTrainer whose loss is the cross-entropy against soft labels ``p_chosen``."""

        collator_cls = SoftLabelCollator

        def _set_signature_columns_if_needed(self):
            if self._signature_columns is None:
                self._signature_columns = ["chosen_ids", "rejected_ids", "p_chosen"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            p = inputs.pop("p_chosen")
            _, outputs = super().compute_loss(model, inputs, return_outputs=True)  # keeps TRL's metrics
            r_c, r_r = torch.chunk(outputs.logits.squeeze(-1), chunks=2)
            loss = soft_preference_loss(r_c, r_r, p.to(r_c.dtype))
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * torch.mean((r_c + r_r) ** 2)
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer, SoftLabelCollator


def split_pairs(records: Sequence[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle reproducibly and hold out ``fraction`` of the pairs (at least one when there are ≥ 4)."""
    rows = list(records)
    random.Random(seed).shuffle(rows)
    n_eval = int(round(len(rows) * fraction))
    if fraction > 0 and n_eval == 0 and len(rows) >= 4:
        n_eval = 1
    return rows[n_eval:], rows[:n_eval]


def train_reward(
    base_spec: str,
    records: Sequence[dict],
    output_dir: Path,
    settings: RewardTrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    tracking: StageTracking | None = None,
) -> TrainResult:
    """Train a reward model on preference records (prompt, chosen, rejected, p_chosen); save the merged model to
    ``output_dir/model`` with its model card; its metrics are the held-out accuracy and calibration. Resumes from
    checkpoints. ``tracking`` names the trackers the trainer reports to."""
    from datasets import Dataset
    from trl import RewardConfig

    from cai.model_card import CardFacts
    from cai.tracking import trainer_callbacks

    train, held = split_pairs(records, settings.eval_fraction, seed)
    if not train:
        raise UserError("reward: no preference pairs to train on; run the preferences stage with more prompts")
    output_dir = Path(output_dir)
    model, tok = load_trainable(base_spec, seed=seed, head="reward")
    args = RewardConfig(
        **trl_args(output_dir / "checkpoints", seed=seed, progress=progress, tracking=tracking),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        save_strategy="epoch",
        save_total_limit=1,
    )
    trainer_cls, collator_cls = _soft_trainer_cls()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(
            {**preference_columns(train), "p_chosen": [float(r.get("p_chosen", 1.0)) for r in train]}
        ),
        processing_class=tok,
        data_collator=collator_cls(pad_token_id=tok.pad_token_id),
        peft_config=lora_config(settings, "SEQ_CLS") if settings.lora else None,
        callbacks=trainer_callbacks(tracking),
    )
    train_and_save(trainer, tok, output_dir, adapter=False)
    metrics = {
        "train_pairs": len(train),
        "heldout_pairs": len(held),
        "train_loss": _last(trainer.state.log_history, "train_loss"),
    }
    if held and trainer.accelerator.is_main_process:
        scorer = RewardScorer(trainer.model.eval(), tok)
        metrics.update(heldout_metrics(scorer, held, settings.calibration_bins))
    result = TrainResult(output_dir, None, output_dir / "model", metrics)
    data = {"preference pairs trained on": len(train), "held out": len(held)}
    shown = {k: v for k, v in metrics.items() if k not in ("train_pairs", "heldout_pairs", "reliability")}
    write_cards(
        result, CardFacts("reward-model", str(base_spec), settings=settings.model_dump(), data=data, metrics=shown)
    )
    return result


def _last(history: list[dict], key: str):
    vals = [h[key] for h in history if key in h]
    return vals[-1] if vals else None


def heldout_metrics(scorer: RewardScorer, rows: Sequence[dict], bins: int = 5) -> dict:
    """Accuracy (the model ranks the labeller's chosen response higher), soft-label cross-entropy, ECE and a
    reliability table of q = σ(r_chosen - r_rejected) against the labels."""
    prompts = [r["prompt"] for r in rows]
    rc = scorer.raw(prompts, [r["chosen"] for r in rows])
    rr = scorer.raw(prompts, [r["rejected"] for r in rows])
    q = [1 / (1 + math.exp(-(c - r))) for c, r in zip(rc, rr, strict=False)]
    p = [float(r.get("p_chosen", 1.0)) for r in rows]
    correct = [(qi > 0.5) == (pi >= 0.5) for qi, pi in zip(q, p, strict=False)]
    eps = 1e-6
    xent = -sum(
        pi * math.log(max(qi, eps)) + (1 - pi) * math.log(max(1 - qi, eps)) for qi, pi in zip(q, p, strict=False)
    ) / len(q)
    table, ece = [], 0.0
    conf = [max(qi, 1 - qi) for qi in q]
    for b in range(bins):
        lo, hi = 0.5 + 0.5 * b / bins, 0.5 + 0.5 * (b + 1) / bins
        idx = [i for i, c in enumerate(conf) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            mean_conf = sum(conf[i] for i in idx) / len(idx)
            ece += len(idx) / len(q) * abs(acc - mean_conf)
            table.append({"bin": f"{lo:.2f}-{hi:.2f}", "n": len(idx), "confidence": mean_conf, "accuracy": acc})
    from cai.evaluation.metrics import rate

    return {"heldout_accuracy": rate(correct), "heldout_soft_xent": xent, "heldout_ece": ece, "reliability": table}


@dataclass
class RewardScorer:
    """A loaded reward model. ``score`` gives σ(reward) in [0, 1]; ``raw`` the scalar head's value."""

    model: Any  # a transformers sequence-classification model
    tokenizer: Any
    batch_size: int = 8
    max_length: int = 1024

    def raw(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        import torch

        if len(prompts) != len(responses):
            raise ValueError("prompts and responses must have the same length")
        texts = [chat_text(self.tokenizer, p, r) for p, r in zip(prompts, responses, strict=False)]
        device = next(self.model.parameters()).device
        out: list[float] = []
        for k in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[k : k + self.batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
                padding_side="right",
            ).to(device)
            with torch.inference_mode():
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [1 / (1 + math.exp(-x)) for x in self.raw(prompts, responses)]


def load_reward_model(path: str | Path, *, device: str | None = None) -> RewardScorer:
    """Load a reward model folder (a run's ``reward/model``, a run folder, or a PEFT adapter on a seq-cls model)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from cai.models import load_tokenizer

    p = Path(path)
    for cand in (p, p / "model", p / "reward" / "model"):
        if (cand / "config.json").is_file() or (cand / "adapter_config.json").is_file():
            p = cand
            break
    else:
        raise UserError(
            f"{path}: no reward model there; pass a run folder with a completed reward stage "
            "or its reward/model folder"
        )
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (p / "adapter_config.json").is_file():
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(str(p), num_labels=1).merge_and_unload()
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(p), dtype=torch.float32)
    tok = load_tokenizer(str(p))
    model.config.pad_token_id = tok.pad_token_id
    return RewardScorer(model.to(device).eval(), tok)
