"""SFT tokens/s, padded batches vs TRL's padding-free collator, on variable-length chat data (LoRA).

Both runs train the same LoRA settings for one epoch over the same records, in the same order. Padded: every
batch is padded to its longest row. Padding-free (``SFTConfig(padding_free=True)``): the rows of a batch are
concatenated into one sequence with per-row ``position_ids`` (transformers masks across row boundaries), so
no FLOPs are spent on pad tokens. Tokens/s counts real tokens only. Utilisation uses 4 × parameters FLOPs per
token (forward 2P + backward to the activations 2P; the frozen base gets no weight gradients).
"""

from __future__ import annotations

import tempfile
from typing import Any

from cai.bench.common import BenchContext, rate, redteam_prompts, row
from cai.models import ModelSpec

NAME = "sft"
NOTE = (
    "Padding-free gains what padding wastes: on data whose lengths vary a lot within a batch it approaches "
    "the padded share of the batch; on uniform data it gains nothing. The LoRA step also pays optimizer and "
    "adapter overheads that are not in the 4 × parameters count."
)

FILLER = "Consent, safety and respect matter in every answer. "


def variable_records(n: int) -> list[dict]:
    """Chat records whose answers range from one to twelve sentences (deterministic)."""
    return [
        {
            "id": f"r{i}",
            "messages": [{"role": "user", "content": p}, {"role": "assistant", "content": FILLER * (1 + (i * 7) % 12)}],
        }
        for i, p in enumerate(redteam_prompts(n))
    ]


def train_tokens_per_s(
    spec: str | ModelSpec, records: list[dict], padding_free: bool, batch_size: int, seed: int = 0
) -> dict[str, float]:
    """One epoch of LoRA SFT; returns real tokens, seconds and tokens/s."""
    import math

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import set_seed
    from trl import SFTConfig, SFTTrainer

    from cai.models import load_causal_lm
    from cai.training.sft import to_prompt_completion

    set_seed(seed)
    model, tok = load_causal_lm(spec, dtype="float32")
    tok.padding_side = "right"
    with tempfile.TemporaryDirectory(prefix="cai-bench-sft-") as out:
        args = SFTConfig(
            output_dir=out,
            per_device_train_batch_size=batch_size,
            max_steps=math.ceil(len(records) / batch_size),
            learning_rate=2e-4,
            max_length=None if padding_free else 1024,
            padding_free=padding_free,
            completion_only_loss=True,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            bf16=torch.cuda.is_available()
            and torch.cuda.is_bf16_supported(),  # TRL's default: bf16 autocast, ~9x slower on CPU
            gradient_checkpointing=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            processing_class=tok,
            train_dataset=Dataset.from_list([to_prompt_completion(r) for r in records]),
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        dataset: Any = trainer.train_dataset  # a datasets.Dataset here (TRL types it as any dataset or None)
        tokens = sum(len(x) for x in dataset["input_ids"])
        seconds = trainer.train().metrics["train_runtime"]
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(rate(tokens, seconds), 2)}


def run(ctx: BenchContext) -> dict[str, Any]:
    s = ctx.sizes
    records = variable_records(s["records"])
    padded = train_tokens_per_s(ctx.spec, records, False, s["batch_size"])
    free = train_tokens_per_s(ctx.spec, records, True, s["batch_size"])
    ratio = free["tokens_per_s"] / max(padded["tokens_per_s"], 1e-9)
    util = free["tokens_per_s"] * 4 * ctx.params / ctx.matmul_flops
    rows = [
        row("SFT tokens/s, padded", padded["tokens_per_s"], "tok/s", note=f"LoRA, batch {s['batch_size']}"),
        row("SFT tokens/s, padding-free", free["tokens_per_s"], "tok/s"),
        row("padding-free ÷ padded", ratio, "×", 1.3),
        row("SFT utilisation, padding-free", util * 100, "% of matmul", note="4 × params FLOPs/token"),
    ]
    return {
        "records": len(records),
        "batch_size": s["batch_size"],
        "padded": padded,
        "padding_free": free,
        "ratio": round(ratio, 3),
        "utilisation": round(util, 4),
        "rows": rows,
    }
