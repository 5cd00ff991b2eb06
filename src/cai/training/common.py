"""What every trainer here (sft, reward, rl, dpo) shares: loading the model to train, the TRL arguments set
the same way everywhere, LoRA, checkpoint resume, the main-process check, the merged save and the result type."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from cai.errors import UserError

if TYPE_CHECKING:
    from cai.model_card import CardFacts
    from cai.models import ModelSpec
    from cai.tracking import StageTracking


@dataclass
class TrainResult:
    """Where a trainer wrote its outputs. ``merged_dir`` is a plain HF model folder usable as a model spec (for
    SFT without a merged save: the adapter folder, which model specs also accept)."""

    output_dir: Path
    adapter_dir: Path | None
    merged_dir: Path
    metrics: dict = field(default_factory=dict)


def write_cards(result: TrainResult, facts: CardFacts) -> None:
    """On the main process, the model card (README.md, replacing PEFT's template) of the result's loadable folder
    and of its adapter folder, from what the trainer knows (a pipeline run re-renders them with more: see
    cai.stages.model_cards)."""
    from dataclasses import replace

    from cai.model_card import write_model_card

    if not is_main_process():
        return
    adapter = result.adapter_dir
    write_model_card(result.merged_dir, replace(facts, adapter=adapter is not None and result.merged_dir == adapter))
    if adapter is not None and adapter != result.merged_dir:
        write_model_card(adapter, replace(facts, adapter=True))


def _bf16_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def trl_args(
    output_dir: Path,
    *,
    seed: int,
    progress: bool,
    checkpointing: bool | None = None,
    tracking: StageTracking | None = None,
) -> dict:
    """The TRL config arguments every trainer here sets alike, each where TRL's default (trl/trainer/base_config.py,
    over transformers' TrainingArguments) does not fit. ``checkpointing`` defaults to "on a CUDA GPU"; ``tracking``
    names the trackers to report to (the trainer adds :func:`cai.tracking.trainer_callbacks`)."""
    import torch

    from cai.tracking import trainer_args

    cuda = torch.cuda.is_available()
    checkpointing = cuda if checkpointing is None else checkpointing
    return dict(
        output_dir=str(output_dir),
        seed=seed,
        # TRL logs every 10 steps; runs here are a few dozen steps and steps.csv, the curves and log_history.json
        # want every one.
        logging_steps=1,
        # The run folder is the record: report only to the trackers the run config's `tracking` section names,
        # never to one that happens to be installed (older transformers defaulted to "all").
        **trainer_args(tracking),
        disable_tqdm=not progress,
        # Without CUDA, the CPU: transformers would otherwise take any other device torch sees (MPS, XPU), which
        # nothing here is tested on.
        use_cpu=not cuda,
        # TRL's default (bf16 unless fp16) autocasts CPUs to bf16 too, which made each CPU step ~9x slower (GRPO
        # 114 s -> 13 s); bf16 only on a GPU that has it.
        bf16=_bf16_gpu(),
        # TRL defaults checkpointing on (less memory for ~20% more time); without memory pressure (CPU, small
        # models) it only costs time. transformers calls it activation_checkpointing and keeps
        # gradient_checkpointing, which TRL's config sets to True, as a deprecated alias: set both.
        activation_checkpointing=checkpointing,
        gradient_checkpointing=checkpointing,
    )


def load_trainable(
    spec: str | ModelSpec,
    *,
    seed: int,
    head: Literal["causal-lm", "reward"] = "causal-lm",
    dtype: Literal["float32", "auto"] = "float32",
    qlora: bool = False,
):
    """(model, tokenizer) to train from an in-process model spec, on the CPU (the trainer places it).

    The seed is set first, so a reward model's new scalar head (``head="reward"``: one label, the tokenizer's pad
    token) is the same every run. ``dtype="auto"`` loads bf16 weights on a GPU that has bf16, else float32.
    ``qlora`` loads a causal LM in 4 bits on this process's GPU, ready for LoRA."""
    from transformers import set_seed

    from cai.models import as_spec, load_causal_lm, load_tokenizer, resolve_local

    s = as_spec(spec)
    if not s.in_process:
        raise UserError(
            f"cannot fine-tune {s.raw!r}: it is served over HTTP; set the model to a local folder, a hub "
            "id or smollm2-135m"
        )
    set_seed(seed)
    if qlora:
        return _load_4bit(resolve_local(s)), load_tokenizer(s)
    if head == "causal-lm":
        return load_causal_lm(s, dtype="bfloat16" if dtype == "auto" and _bf16_gpu() else "float32", device="cpu")
    import torch
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(s)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_local(s), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _load_4bit(path: str):
    import torch

    if not torch.cuda.is_available():
        raise UserError("sft.qlora needs a CUDA GPU (4-bit bitsandbytes); set sft.qlora: false on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("sft.qlora needs bitsandbytes: pip install bitsandbytes (or set sft.qlora: false)") from None
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quant, device_map={"": local_rank}, dtype=torch.bfloat16
    )
    return prepare_model_for_kbit_training(model)


def lora_config(settings, task_type: str = "CAUSAL_LM", target_modules: str | list[str] = "all-linear"):
    """A PEFT LoRA config from settings with lora_r/lora_alpha/lora_dropout."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=target_modules,
        task_type=task_type,
    )


def preference_columns(rows: Sequence[dict]) -> dict[str, list]:
    """The conversational columns TRL's preference trainers (DPO, reward) read from (prompt, chosen, rejected)
    records: the prompt as a user turn, each response as an assistant turn."""
    return {
        "prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
        "chosen": [[{"role": "assistant", "content": r["chosen"]}] for r in rows],
        "rejected": [[{"role": "assistant", "content": r["rejected"]}] for r in rows],
    }


def last_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` (to resume a killed run), or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if Path(folder).is_dir() else None


def is_main_process() -> bool:
    """False in the non-main processes of ``accelerate launch`` (which must not write run artifacts)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def save_merged(model, tokenizer, out: Path, adapter_dir: Path | None = None) -> Path:
    """Save the adapter (when ``adapter_dir``) and a merged plain HF model folder to ``out``, written to
    ``out.tmp`` and renamed, so ``out`` is never half written."""
    from peft import PeftModel

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, PeftModel):
        if adapter_dir is not None:
            model.save_pretrained(str(adapter_dir))
        model = model.merge_and_unload()
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def save_training_outputs(
    trainer, tok, output_dir: Path, *, adapter: bool, curves: tuple[Path, Sequence[str], str] | None = None
) -> Path | None:
    """On the main process: ``model/`` (merged), ``adapter/`` when ``adapter``, ``log_history.json`` and, given
    ``curves`` = (steps CSV, columns, title), ``curves.png``; then every process waits. Returns the adapter folder."""
    from cai.training.curves import plot_curves

    adapter_dir = output_dir / "adapter" if adapter else None
    if trainer.accelerator.is_main_process:
        save_merged(trainer.model, tok, output_dir / "model", adapter_dir)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        if curves is not None:
            steps_csv, columns, title = curves
            plot_curves(steps_csv, columns, output_dir / "curves.png", title)
    trainer.accelerator.wait_for_everyone()
    return adapter_dir


def train_and_save(
    trainer, tok, output_dir: Path, *, adapter: bool, curves: tuple[Path, Sequence[str], str] | None = None
) -> Path | None:
    """Train, resuming from the newest checkpoint in ``output_dir/checkpoints`` (where :func:`trl_args` put them),
    then :func:`save_training_outputs`. Returns the adapter folder (None without ``adapter``)."""
    trainer.train(resume_from_checkpoint=last_checkpoint(output_dir / "checkpoints"))
    return save_training_outputs(trainer, tok, output_dir, adapter=adapter, curves=curves)
