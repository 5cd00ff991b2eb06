"""Online RL against the reward model with TRL ``GRPOTrainer`` (or ``RLOOTrainer``), plus the helpers the
policy trainers share: LoRA config, checkpoint resume, merge-and-save, per-step CSV logging and curve plots.

TRL has no PPO trainer any more (removed in TRL 0.2x); GRPO and RLOO are its online RL methods. Both sample
``num_generations`` completions per prompt and use the group's rewards as the baseline, so no value model is
needed — which also tames the reward variance that kept PPO from learning in small setups.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field

from cai.errors import UserError
from cai.settings import Strict

STEP_FIELDS = ("step", "reward_mean", "reward_std", "kl", "response_length", "loss")


class RLSettings(Strict):
    """Online RL settings (LoRA on the SL model; the reward model is the reward function)."""

    algorithm: Literal["grpo", "rloo"] = "grpo"
    steps: int = Field(16, ge=1, description="optimizer steps")
    prompts_per_step: int = Field(2, ge=1)
    num_generations: int = Field(4, ge=2, description="completions per prompt (the group for the baseline)")
    max_completion_length: int = Field(48, ge=1)
    temperature: float = Field(1.0, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    beta: float = Field(0.04, ge=0, description="KL coefficient against the starting (SL) model; 0 disables KL")
    lora: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    samples_per_step: int = Field(4, ge=0, description="(prompt, response, reward) rows logged per step")
    use_vllm: bool = Field(False, description="generate the RL samples with vLLM inside TRL (CUDA GPU + vllm)")
    vllm_mode: Literal["colocate", "server"] = Field("colocate", description="colocate: vLLM shares the training "
                                                     "GPU; server: a separate `trl vllm-serve` process")
    vllm_server_base_url: str | None = Field(None, description="server mode: the `trl vllm-serve` URL")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocate mode: vLLM's GPU share")


@dataclass
class PolicyResult:
    """What a policy trainer leaves behind (same fields as the SFT helper's result)."""

    output_dir: Path
    adapter_dir: Path | None
    merged_dir: Path
    metrics: dict = field(default_factory=dict)


# ---- shared helpers ---------------------------------------------------------------------------------------
def lora_config(settings, task_type: str = "CAUSAL_LM"):
    """A PEFT LoRA config from settings with lora_r/lora_alpha/lora_dropout (all linear layers)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules="all-linear", task_type=task_type)



def save_training_outputs(trainer, tok, output_dir: Path, lora: bool, steps_csv: Path, columns: list[str],
                          title: str) -> Path | None:
    """On the main process: the merged model (and adapter), the log history and the curves PNG; then sync.
    Returns the adapter folder (None without LoRA)."""
    adapter = output_dir / "adapter" if lora else None
    if trainer.accelerator.is_main_process:
        save_merged(trainer.model, tok, output_dir / "model", adapter)
        (output_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
        plot_curves(steps_csv, columns, output_dir / "curves.png", title)
    trainer.accelerator.wait_for_everyone()
    return adapter

def is_main_process() -> bool:
    """False in the non-main processes of ``accelerate launch`` (which must not write run artifacts)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def last_checkpoint(folder: Path) -> str | None:
    """The newest ``checkpoint-N`` in ``folder`` (to resume a killed run), or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(folder)) if Path(folder).is_dir() else None


def save_merged(model, tokenizer, out: Path, adapter_dir: Path | None = None) -> Path:
    """Save the adapter (when ``adapter_dir``) and a merged plain HF model folder to ``out`` (atomically)."""
    import os
    import shutil

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


def step_logger(csv_path: Path, keys: dict[str, str]):
    """A TrainerCallback writing one CSV row per logging step: ``keys`` maps CSV column -> TRL log key."""
    from transformers import TrainerCallback

    class StepLogger(TrainerCallback):
        last = max((int(r["step"]) for r in read_steps(csv_path)), default=-1)  # resumed runs re-log no step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or not any(k in logs for k in keys.values()):
                return
            if state.global_step <= self.last:
                return
            self.last = state.global_step
            new = not csv_path.exists()
            with open(csv_path, "a", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", *keys])
                w.writerow([state.global_step, *(logs.get(k, "") for k in keys.values())])

    return StepLogger()


def read_steps(csv_path: Path) -> list[dict]:
    if not Path(csv_path).exists():
        return []
    with open(csv_path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def plot_curves(csv_path: Path, columns: Sequence[str], png: Path, title: str) -> Path | None:
    """Plot the given CSV columns against step, one panel each."""
    rows = read_steps(csv_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.2), squeeze=False)
    for ax, col in zip(axes[0], columns):
        pts = [(int(r["step"]), float(r[col])) for r in rows if r.get(col) not in ("", None)]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3)
        if col == "reward_mean" and all(r.get("reward_std") not in ("", None) for r in rows):
            x = [int(r["step"]) for r in rows]
            m, sd = [float(r[col]) for r in rows], [float(r["reward_std"]) for r in rows]
            ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], alpha=0.2,
                            label="± std within step")
            ax.legend(fontsize=7)
        ax.set_title(col)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def trend(csv_path: Path, column: str) -> dict:
    """First-half vs second-half mean of a logged column (did it go up?)."""
    vals = [float(r[column]) for r in read_steps(csv_path) if r.get(column) not in ("", None)]
    if len(vals) < 2:
        return {"first_half": None, "second_half": None, "delta": None}
    h = len(vals) // 2
    a, b = sum(vals[:h]) / h, sum(vals[h:]) / (len(vals) - h)
    return {"first_half": a, "second_half": b, "delta": b - a, "first": vals[0], "last": vals[-1]}


# ---- GRPO / RLOO -------------------------------------------------------------------------------------------
class RewardFunction:
    """The reward model as a TRL reward function; logs sampled (prompt, response, reward) rows to CSV. After a
    resume, steps already in the CSV are not logged again."""

    def __init__(self, scorer, samples_csv: Path, per_step: int):
        self.scorer, self.samples_csv, self.per_step = scorer, Path(samples_csv), per_step
        self.logged_until = max((int(r["step"]) for r in read_steps(self.samples_csv)), default=0)
        self.__name__ = "reward_model"

    def __call__(self, prompts, completions, trainer_state=None, **_) -> list[float]:
        user = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = self.scorer.score(user, text)
        step = trainer_state.global_step + 1 if trainer_state is not None else 0
        if self.per_step and step > self.logged_until and trainer_state.is_world_process_zero:
            new = not self.samples_csv.exists()
            with open(self.samples_csv, "a", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["step", "prompt", "response", "reward"])
                for u, t, r in list(zip(user, text, rewards))[: self.per_step]:
                    w.writerow([step, u, t, round(r, 4)])
        return rewards


def vllm_args(settings: RLSettings) -> dict:
    """TRL's vLLM generation arguments, or a UserError when this machine cannot run vLLM."""
    if not settings.use_vllm:
        return {}
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UserError("rl.use_vllm needs a CUDA GPU; set rl.use_vllm: false on this machine")
    if importlib.util.find_spec("vllm") is None:
        raise UserError("rl.use_vllm needs vllm: pip install vllm (or set rl.use_vllm: false)")
    if settings.vllm_mode == "server":
        return {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": settings.vllm_server_base_url}
    return {"use_vllm": True, "vllm_mode": "colocate",
            "vllm_gpu_memory_utilization": settings.vllm_gpu_memory_utilization}


def train_rl(base_spec: str, prompts: Sequence[str], reward_model: str | Path, output_dir: Path,
             settings: RLSettings, *, seed: int = 0, progress: bool = True) -> PolicyResult:
    """Optimise the policy ``base_spec`` on ``prompts`` against the reward model; writes steps.csv,
    samples.csv, curves.png, adapter/ and model/ (merged) under ``output_dir``. Resumes from checkpoints."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from cai.models import load_tokenizer, resolve_local
    from cai.training.reward import load_reward_model

    if settings.algorithm == "grpo":
        from trl import GRPOConfig as Config, GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config, RLOOTrainer as Trainer

    generation = vllm_args(settings)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(base_spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(resolve_local(base_spec), dtype=torch.float32)
    scorer = load_reward_model(reward_model)
    batch = settings.prompts_per_step * settings.num_generations
    args = Config(
        output_dir=str(output_dir / "checkpoints"), max_steps=settings.steps, learning_rate=settings.learning_rate,
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length, temperature=settings.temperature, beta=settings.beta,
        seed=seed, logging_steps=1, save_strategy="steps", save_steps=max(1, settings.steps // 2),
        save_total_limit=1, report_to=[], disable_tqdm=not progress, use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=torch.cuda.is_available(),
        gradient_checkpointing=torch.cuda.is_available(),  # TRL defaults it on; on CPU it only costs time
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),  # TRL's default autocasts CPUs to bf16: ~20x slower
        **generation,
    )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    steps_csv = output_dir / "steps.csv"
    logger = step_logger(steps_csv, {"reward_mean": "reward", "reward_std": "reward_std", "kl": "kl",
                                     "response_length": "completions/mean_length", "loss": "loss"})
    trainer = Trainer(model=model, reward_funcs=RewardFunction(scorer, output_dir / "samples.csv",
                                                               settings.samples_per_step),
                      args=args, train_dataset=dataset, processing_class=tok, callbacks=[logger],
                      peft_config=lora_config(settings) if settings.lora else None)
    trainer.train(resume_from_checkpoint=last_checkpoint(output_dir / "checkpoints"))
    adapter = save_training_outputs(trainer, tok, output_dir, settings.lora, steps_csv,
                                    ["reward_mean", "kl", "response_length"],
                                    f"{settings.algorithm.upper()} against the reward model")
    metrics = {"steps": trainer.state.global_step, "reward_trend": trend(steps_csv, "reward_mean"),
               "kl_last": trend(steps_csv, "kl").get("last")}
    return PolicyResult(output_dir, adapter, output_dir / "model", metrics)
