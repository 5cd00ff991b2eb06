"""Supervised fine-tuning on chat records with TRL's ``SFTTrainer`` (LoRA by default, full or 4-bit QLoRA as
options), shared by SL-CAI and every experiment that fine-tunes a model on conversations.

Records are ``{"id", "messages"}``; each becomes a conversational prompt/completion pair (everything before the
last assistant turn / that turn). SmolLM2's chat template has no ``{% generation %}`` markers, so TRL's
``assistant_only_loss`` cannot mask it; the completion mask of the prompt/completion format can, for any template.
``loss_on: assistant`` trains on the final assistant turn (with its end-of-turn token); ``all`` on every token.
A record may also carry ``prefill``: the start of its final assistant turn, given to the model as context and not
trained on (the compliant prefix of a prefill-recovery example); such sets are rendered with the chat template
into text prompt/completion pairs, so the mask can end inside the assistant turn.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from cai.base_config import Strict
from cai.errors import UserError
from cai.runs import write_json
from cai.training.common import (
    TrainResult,
    last_checkpoint,
    load_trainable,
    lora_config,
    save_merged,
    trl_args,
    write_cards,
)
from cai.training.curves import plot_loss

if TYPE_CHECKING:
    from cai.tracking import StageTracking

log = logging.getLogger(__name__)


class SFTTrainConfig(Strict):
    """How to fine-tune. ``max_steps`` (when set) overrides ``epochs``."""

    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1, description="per-device train batch size")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(384, ge=16, description="tokens per example; longer ones are truncated")
    lora: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    full_finetune: bool = Field(False, description="train every weight (no adapter); overrides lora")
    qlora: bool = Field(False, description="4-bit base + LoRA; needs a CUDA GPU and bitsandbytes")
    loss_on: Literal["assistant", "all"] = "assistant"
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="held-out share of records for eval loss")
    max_steps: int | None = Field(None, ge=1)
    save_steps: int = Field(25, ge=1, description="checkpoint (and eval) every N optimizer steps")
    save_merged: bool = Field(True, description="also save base+adapter merged into a plain HF folder")
    activation_checkpointing: bool | None = Field(
        None,
        description="recompute activations in the backward pass instead of keeping them (same losses, more time, "
        "less peak memory): null = with qlora only; true/false = always/never",
    )

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``activation_checkpointing`` is left out of dumps at its default, so the config hashes of SFT stages and
        experiment steps finished before it existed stay the same (and those are reused)."""
        data = handler(self)
        if data.get("activation_checkpointing") is None:
            data.pop("activation_checkpointing", None)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> SFTTrainConfig:
        if self.qlora and self.full_finetune:
            raise ValueError("qlora and full_finetune exclude each other (QLoRA trains a LoRA adapter)")
        return self

    @property
    def uses_adapter(self) -> bool:
        return not self.full_finetune and (self.lora or self.qlora)

    @property
    def checkpointing(self) -> bool:
        """Whether the trainer recomputes activations: the setting, or by default with QLoRA only."""
        return self.qlora if self.activation_checkpointing is None else self.activation_checkpointing


def to_prompt_completion(record: dict) -> dict:
    """``{"id", "messages"}`` → TRL's conversational ``{"prompt": [...], "completion": [last assistant turn]}``."""
    msgs = record.get("messages")
    rid = record.get("id", "?")
    if not isinstance(msgs, list) or not msgs:
        raise UserError(f"SFT record {rid!r}: 'messages' must be a non-empty list of {{role, content}}")
    for m in msgs:
        if (
            not isinstance(m, dict)
            or m.get("role") not in ("system", "user", "assistant")
            or not isinstance(m.get("content"), str)
        ):
            raise UserError(f"SFT record {rid!r}: every message needs role system|user|assistant and text content")
    if msgs[-1]["role"] != "assistant" or len(msgs) < 2:
        raise UserError(f"SFT record {rid!r}: the last message must be the assistant's answer, after a user turn")
    prefill = record.get("prefill")
    if prefill is not None and not (isinstance(prefill, str) and msgs[-1]["content"].startswith(prefill)):
        raise UserError(f"SFT record {rid!r}: 'prefill' must be text that starts the last assistant message")
    return {
        "prompt": [dict(role=m["role"], content=m["content"]) for m in msgs[:-1]],
        "completion": [dict(role="assistant", content=msgs[-1]["content"])],
    }


def to_text_prompt_completion(record: dict, tok) -> dict:
    """``{"id", "messages", "prefill"?}`` → a text ``{"prompt", "completion"}`` rendered with ``tok``'s chat
    template; the prompt ends after ``prefill`` (if any), so the loss covers only the rest of the assistant turn and
    its end-of-turn token."""
    pc = to_prompt_completion(record)
    head = tok.apply_chat_template(pc["prompt"], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(pc["prompt"] + pc["completion"], tokenize=False)
    prompt = head + (record.get("prefill") or "")
    if not full.startswith(prompt):
        raise UserError(
            f"SFT record {record.get('id', '?')!r}: the chat template does not render the assistant "
            "turn verbatim, so its 'prefill' cannot be masked; drop 'prefill' from the records"
        )
    completion = full[len(prompt) :]
    eos = tok.eos_token or ""
    if eos and completion.rstrip().endswith(eos):
        completion = completion.rstrip()  # TRL appends the EOS to a text completion that does not end with it
    return {"prompt": prompt, "completion": completion}


def split_records(records: list[dict], eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval split by a hash of each id (stable when records are added or reordered)."""
    if eval_fraction <= 0 or len(records) < 4:
        return list(records), []

    def bucket(r: dict) -> float:
        return int(hashlib.sha1(str(r["id"]).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF

    held = [r for r in records if bucket(r) < eval_fraction] or [min(records, key=bucket)]
    held_ids = {id(r) for r in held}
    return [r for r in records if id(r) not in held_ids], held


def _sft_config(
    settings: SFTTrainConfig,
    ckpt_dir: Path,
    seed: int,
    has_eval: bool,
    progress: bool,
    tracking: StageTracking | None = None,
):
    from trl import SFTConfig

    return SFTConfig(
        # by default only QLoRA (memory pressure) recomputes activations
        **trl_args(ckpt_dir, seed=seed, progress=progress, checkpointing=settings.checkpointing, tracking=tracking),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps or -1,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        max_length=settings.max_length,
        completion_only_loss=settings.loss_on == "assistant",
        eval_strategy="steps" if has_eval else "no",
        eval_steps=settings.save_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        data_seed=seed,
        dataloader_num_workers=0,
    )


def _merged_dir(output_dir: Path, adapter_dir: Path | None, settings: SFTTrainConfig) -> Path:
    """The loadable result: merged/ when saved, else the adapter folder (model specs accept both)."""
    return output_dir / "merged" if settings.save_merged or adapter_dir is None else adapter_dir


def build_trainer(
    base_spec: str,
    train_recs: list[dict],
    eval_recs: list[dict],
    output_dir: Path,
    settings: SFTTrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    tracking: StageTracking | None = None,
):
    """(SFTTrainer, tokenizer) over prompt/completion datasets; checkpoints go to ``output_dir/checkpoints``;
    ``tracking`` names the trackers it reports to."""
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTTrainer

    from cai.tracking import trainer_callbacks

    model, tok = load_trainable(base_spec, seed=seed, dtype="auto", qlora=settings.qlora)
    tok.padding_side = "right"
    if any(r.get("prefill") for r in [*train_recs, *eval_recs]):

        def convert(record: dict) -> dict:
            return to_text_prompt_completion(record, tok)
    else:
        convert = to_prompt_completion
    trainer = SFTTrainer(
        model=model,
        args=_sft_config(settings, Path(output_dir) / "checkpoints", seed, bool(eval_recs), progress, tracking),
        train_dataset=Dataset.from_list([convert(r) for r in train_recs]),
        eval_dataset=Dataset.from_list([convert(r) for r in eval_recs]) if eval_recs else None,
        processing_class=tok,
        peft_config=lora_config(settings, target_modules=settings.target_modules) if settings.uses_adapter else None,
        callbacks=trainer_callbacks(tracking),
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)
    return trainer, tok


def train_sft(
    base_spec: str,
    records: list[dict],
    output_dir: Path,
    settings: SFTTrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    tracking: StageTracking | None = None,
) -> TrainResult:
    """Fine-tune ``base_spec`` on chat ``records`` into ``output_dir`` (checkpoints/, adapter/, merged/ with their
    model cards, metrics.json, log_history.json, loss_curve.png). Resumes from the newest checkpoint; a finished
    output folder is returned as is. ``tracking`` names the trackers the trainer reports to."""
    output_dir = Path(output_dir)
    adapter_dir = output_dir / "adapter" if settings.uses_adapter else None
    if (output_dir / "metrics.json").is_file():  # written last: the folder is complete
        metrics = json.loads((output_dir / "metrics.json").read_text())
        return TrainResult(output_dir, adapter_dir, _merged_dir(output_dir, adapter_dir, settings), metrics)
    if not records:
        raise UserError("no SFT records to train on; check the critique stage's sft.jsonl")
    train_recs, eval_recs = split_records(records, settings.eval_fraction)
    trainer, tok = build_trainer(
        base_spec, train_recs, eval_recs, output_dir, settings, seed=seed, progress=progress, tracking=tracking
    )
    last = last_checkpoint(output_dir / "checkpoints")
    if last:
        log.info("resuming SFT from %s", last)
    out = trainer.train(resume_from_checkpoint=last)
    metrics = {
        "train_loss": round(out.training_loss, 4),
        "steps": trainer.state.global_step,
        "train_runtime_s": round(out.metrics.get("train_runtime", 0.0), 1),
        "resumed_from": last,
        "n_train": len(train_recs),
        "n_eval": len(eval_recs),
        "loss_on": settings.loss_on,
        "method": "qlora" if settings.qlora else ("lora" if settings.uses_adapter else "full"),
        "base": base_spec,
    }
    if eval_recs:
        metrics["eval_loss"] = round(trainer.evaluate()["eval_loss"], 4)
    result = TrainResult(output_dir, adapter_dir, _merged_dir(output_dir, adapter_dir, settings), metrics)
    if trainer.is_world_process_zero():
        _save_outputs(trainer, tok, result, settings)
    trainer.accelerator.wait_for_everyone()
    return result


def _save_outputs(trainer, tok, result: TrainResult, settings: SFTTrainConfig) -> None:
    """Logs, loss curve, the adapter (with the tokenizer: the folder is a model spec), the merged model, their
    model cards, and metrics.json last (it marks the folder complete)."""
    from cai.model_card import CardFacts

    output_dir, adapter_dir, metrics = result.output_dir, result.adapter_dir, result.metrics
    model = trainer.model
    history = trainer.state.log_history
    write_json(output_dir / "log_history.json", history)
    plot_loss(
        history, output_dir / "loss_curve.png", f"SFT loss ({metrics['method']}, loss on {settings.loss_on} tokens)"
    )
    if adapter_dir is not None:
        model.save_pretrained(adapter_dir)
        tok.save_pretrained(adapter_dir)
    if settings.save_merged or adapter_dir is None:
        # a 4-bit base cannot be merged in place; reload it in bf16 and merge the adapter (QLoRA always saves one)
        full = _merge_qlora(adapter_dir) if settings.qlora and adapter_dir is not None else model
        tok.padding_side = "left"
        save_merged(full, tok, output_dir / "merged")
    data = {"chat records trained on": metrics["n_train"], "held out (eval loss)": metrics["n_eval"]}
    trained = {k: metrics[k] for k in ("train_loss", "eval_loss", "steps", "train_runtime_s") if k in metrics}
    write_cards(
        result, CardFacts("sft", str(metrics["base"]), settings=settings.model_dump(), data=data, metrics=trained)
    )
    write_json(output_dir / "metrics.json", metrics)


def _merge_qlora(adapter_dir: Path):
    import torch
    from peft import AutoPeftModelForCausalLM

    return AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.bfloat16).merge_and_unload()


def heldout_nll(spec: str, records: list[dict]) -> dict[str, float]:
    """Mean per-token negative log-likelihood on ``records`` of the assistant's answer (given the chat) and of
    the user's prompt (given the template's header), with the model under ``spec``."""
    from cai.backends.hf import HFBackend

    backend = HFBackend(spec, batch_size=8)
    pcs = [to_prompt_completion(r) for r in records]
    end = backend.tokenizer.eos_token or ""
    answers = [pc["completion"][0]["content"] + end for pc in pcs]
    before_user = backend.render([{"role": "user", "content": "\x00"}]).split("\x00")[0]
    users = [next(m["content"] for m in reversed(pc["prompt"]) if m["role"] == "user") for pc in pcs]
    ans = backend.logprobs([pc["prompt"] for pc in pcs], [[a] for a in answers])
    usr = backend.logprobs([before_user] * len(users), [[u] for u in users])

    def per_token(lps: list[list[float]], texts: list[str]) -> float:
        n = sum(len(backend.encode(t)) for t in texts)
        return round(-sum(x[0] for x in lps) / max(1, n), 4)

    out = {"answer_nll": per_token(ans, answers), "prompt_nll": per_token(usr, users)}
    backend.close()
    return out


def compare_loss_on(
    base_spec: str,
    records: list[dict],
    out_dir: Path,
    settings: SFTTrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train ``base_spec`` twice on the same records, with the loss on the assistant's tokens and on the whole
    sequence, and measure both (and the base) on the same held-out records. Writes ``out_dir/compare.json``."""
    import time

    _, held = split_records(records, settings.eval_fraction)
    if not held:
        raise UserError("compare-loss needs held-out records: use more records or a larger --eval-fraction")
    results: dict = {
        "base": base_spec,
        "n_records": len(records),
        "n_heldout": len(held),
        "settings": settings.model_dump(),
        "models": {"base": heldout_nll(base_spec, held)},
    }
    for mode in ("assistant", "all"):
        t0 = time.time()
        res = train_sft(
            base_spec,
            records,
            Path(out_dir) / mode,
            settings.model_copy(update={"loss_on": mode}),
            seed=seed,
            progress=progress,
        )
        results["models"][mode] = {
            **heldout_nll(str(res.merged_dir), held),
            "train_loss": res.metrics["train_loss"],
            "steps": res.metrics["steps"],
            "seconds": round(time.time() - t0, 1),
        }
    write_json(Path(out_dir) / "compare.json", results)
    return results
