"""Online RL against the reward model with TRL ``GRPOTrainer`` (or ``RLOOTrainer``).

TRL has no PPO trainer any more (removed in TRL 0.2x); GRPO and RLOO are its online RL methods. Both sample
``num_generations`` completions per prompt and use the group's rewards as the baseline, so no value model is
needed — which also tames the reward variance that kept PPO from learning in small setups.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer

from cai.base_config import Strict
from cai.errors import UserError
from cai.training.common import TrainResult, load_trainable, lora_config, train_and_save, trl_args, write_cards
from cai.training.curves import append_rows, read_steps, step_logger, trend
from cai.training.reward_trend import COLUMNS, REWARDS_CSV, describe, paired_reward_trend, read_rewards

if TYPE_CHECKING:
    from cai.tracking import StageTracking


# what the rules reward grades: the utility averaged over the judge's probabilities, or its verdict's alone
RulesUtility = Literal["expected", "verdict"]


class RLTrainConfig(Strict):
    """Online RL settings (LoRA on the SL model; the reward model is the reward function)."""

    algorithm: Literal["grpo", "rloo"] = "grpo"
    steps: int = Field(16, ge=1, description="optimizer steps")
    prompts_per_step: int = Field(2, ge=1)
    num_generations: int = Field(4, ge=2, description="completions per prompt (the group for the baseline)")
    max_completion_length: int = Field(48, ge=1)
    temperature: float = Field(
        1.0,
        gt=0,
        description="sampling temperature of the completions (TRL's default, 1.0). On the 135M model 0.7 gives harmful "
        "prompts 2-3x more refusals to reinforce, but over 10 seeds of rl-demo it did not reliably make RL safer "
        "(docs/rl-cai.md)",
    )
    learning_rate: float = Field(5e-5, gt=0)
    beta: float = Field(0.04, ge=0, description="KL coefficient against the starting (SL) model; 0 disables KL")
    lora: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    samples_per_step: int = Field(4, ge=0, description="(prompt, response, reward) rows logged per step")
    use_vllm: bool = Field(False, description="generate the RL samples with vLLM inside TRL (CUDA GPU + vllm)")
    vllm_mode: Literal["colocate", "server"] = Field(
        "colocate", description="colocate: vLLM shares the training " "GPU; server: a separate `trl vllm-serve` process"
    )
    vllm_server_base_url: str | None = Field(None, description="server mode: the `trl vllm-serve` URL")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="colocate mode: vLLM's GPU share")
    reward: Literal["model", "rules"] = Field(
        "model",
        description="model: the run's reward model; rules: the rules labeler's utility of each completion (the "
        "constitution's wanted behaviour graded by the offline refusal judge; no reward model is read)",
    )
    activation_checkpointing: bool | None = Field(
        None,
        description="recompute the policy's activations in the backward pass instead of keeping them: null = on a "
        "CUDA GPU only; true also on the CPU, where the same steps (identical losses) cost ~10% more time and the "
        "loss pass's peak memory falls by ~2 GB for 16 completions of ~160 tokens (docs/performance.md)",
    )
    reward_harm: Literal["classifier", "prompt_set"] = Field(
        "classifier",
        description="rules reward: where a prompt's category (harmful or benign) comes from. classifier: the "
        "request-harm classifier (74% on XSTest's prompts); prompt_set: the set the prompt was drawn from (red-team "
        "prompts are harmful, benign ones benign), as the rl stage knows it",
    )

    rules_utility: RulesUtility = Field(
        "expected",
        description="rules reward: expected: the constitution's utility averaged over the refusal judge's "
        "probabilities (a continuous reward: GRPO also climbs the judge's confidence); verdict: the utility of the "
        "judge's verdict alone, so a group trains only where its completions' verdicts differ. On the 135M model "
        "verdict made RL less safe than expected on 3 of 3 seeds of rl-demo (docs/rl-cai.md)",
    )

    @model_serializer(mode="wrap")
    def _omit_new_defaults(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``reward``, ``reward_harm``, ``rules_utility`` and ``activation_checkpointing`` are left out of dumps at
        their defaults, so the config hashes of RL stages finished before they existed stay the same (and those
        stages are reused)."""
        data = handler(self)
        if data.get("reward") == "model":
            del data["reward"]
        if data.get("reward_harm") == "classifier":
            del data["reward_harm"]
        if data.get("rules_utility") == "expected":
            del data["rules_utility"]
        if data.get("activation_checkpointing") is None:
            data.pop("activation_checkpointing", None)
        return data


class RulesReward:
    """The rules labeler's utility (cai.labeling.rules_utilities) as a reward scorer: ``score(prompts, responses)``
    in [-0.2, 1], like a reward model's ``score``. No model is loaded; the refusal judge and the request-harm
    classifier grade each completion. ``harmful`` (prompt -> is it a harmful request) gives the category where
    it is known; other prompts are graded by the classifier. ``utility`` is ``RLTrainConfig.rules_utility``."""

    def __init__(
        self,
        constitution,
        settings=None,
        harmful: Mapping[str, bool] | None = None,
        utility: RulesUtility = "expected",
    ):
        from cai.labeling import LabelConfig

        self.constitution = constitution
        self.settings = settings or LabelConfig(labeler="rules")
        self.harmful = dict(harmful or {})
        self.by_verdict = utility == "verdict"

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        from cai.labeling import rules_utilities

        given = [self.harmful.get(p) for p in prompts] if self.harmful else None
        return rules_utilities(
            prompts, responses, self.constitution, self.settings, harmful=given, by_verdict=self.by_verdict
        )[0]


class RewardFunction:
    """The reward model as a TRL reward function. Logs every completion's (step, prompt, reward) to rewards.csv,
    which the paired reward trend reads (cai.training.reward_trend), and ``per_step`` sampled (prompt, response,
    reward) rows to samples.csv. After a resume, steps already logged are not logged again."""

    def __init__(self, scorer, samples_csv: Path, per_step: int, rewards_csv: Path | None = None):
        self.scorer, self.samples_csv, self.per_step = scorer, Path(samples_csv), per_step
        self.rewards_csv = Path(rewards_csv) if rewards_csv else self.samples_csv.with_name(REWARDS_CSV)
        self.logged_until = max((int(r["step"]) for r in read_steps(self.samples_csv)), default=0)
        self.rewards_until = max((int(r["step"]) for r in read_steps(self.rewards_csv)), default=0)
        self.__name__ = "reward_model"

    def __call__(self, prompts, completions, trainer_state=None, **_) -> list[float]:
        user = [p[-1]["content"] if isinstance(p, list) else p for p in prompts]
        text = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = self.scorer.score(user, text)
        step = trainer_state.global_step + 1 if trainer_state is not None else 0
        main = trainer_state is not None and trainer_state.is_world_process_zero
        if main and step > self.rewards_until:
            append_rows(self.rewards_csv, COLUMNS, [[step, u, round(r, 4)] for u, r in zip(user, rewards, strict=True)])
        if self.per_step and step > self.logged_until and main:
            append_rows(
                self.samples_csv,
                ["step", "prompt", "response", "reward"],
                [
                    [step, u, t, round(r, 4)]
                    for u, t, r in list(zip(user, text, rewards, strict=False))[: self.per_step]
                ],
            )
        return rewards


def vllm_args(settings: RLTrainConfig) -> dict:
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
    return {
        "use_vllm": True,
        "vllm_mode": "colocate",
        "vllm_gpu_memory_utilization": settings.vllm_gpu_memory_utilization,
    }


def train_rl(
    base_spec: str,
    prompts: Sequence[str],
    reward_model: str | Path | RulesReward,
    output_dir: Path,
    settings: RLTrainConfig,
    *,
    seed: int = 0,
    progress: bool = True,
    tracking: StageTracking | None = None,
    prompt_groups: Mapping[str, str] | None = None,
) -> TrainResult:
    """Optimise the policy ``base_spec`` on ``prompts`` against the reward model (a folder, or a
    :class:`RulesReward`); writes steps.csv, rewards.csv (every completion's reward), samples.csv, curves.png,
    adapter/ and model/ (merged) with their model cards under ``output_dir``. Resumes from checkpoints.
    ``tracking`` names the trackers the trainer reports to; ``prompt_groups`` (prompt -> e.g. harmful / benign)
    splits the paired reward trend."""
    from datasets import Dataset

    from cai.model_card import CardFacts
    from cai.tracking import trainer_callbacks
    from cai.training.reward import load_reward_model

    if settings.algorithm == "grpo":
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:  # the same constructor arguments as GRPO's (TRL's two online trainers share them)
        from trl import RLOOConfig as Config  # type: ignore[assignment]
        from trl import RLOOTrainer as Trainer  # type: ignore[assignment]

    generation = vllm_args(settings)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_trainable(base_spec, seed=seed)
    scorer = reward_model if isinstance(reward_model, RulesReward) else load_reward_model(reward_model)
    batch = settings.prompts_per_step * settings.num_generations
    args = Config(
        **trl_args(
            output_dir / "checkpoints",
            seed=seed,
            progress=progress,
            checkpointing=settings.activation_checkpointing,
            tracking=tracking,
        ),
        max_steps=settings.steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=1,
        num_generations=settings.num_generations,
        max_completion_length=settings.max_completion_length,
        temperature=settings.temperature,
        beta=settings.beta,
        save_strategy="steps",
        save_steps=max(1, settings.steps // 2),
        save_total_limit=1,
        **generation,
    )
    dataset = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in prompts]})
    steps_csv = output_dir / "steps.csv"
    logger = step_logger(
        steps_csv,
        {
            "reward_mean": "reward",
            "reward_std": "reward_std",
            "kl": "kl",
            "response_length": "completions/mean_length",
            "loss": "loss",
        },
    )
    trainer = Trainer(
        model=model,
        # a callable object returning list[float]; TRL's annotation only names functions and models
        reward_funcs=RewardFunction(scorer, output_dir / "samples.csv", settings.samples_per_step),  # type: ignore[arg-type]
        args=args,
        train_dataset=dataset,
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
            ["reward_mean", "kl", "response_length"],
            f"{settings.algorithm.upper()} against the "
            + ("rules reward" if isinstance(reward_model, RulesReward) else "reward model"),
        ),
    )
    reward = trend(steps_csv, "reward_mean")
    paired = paired_reward_trend(read_rewards(output_dir / REWARDS_CSV), prompt_groups)
    if progress:
        print(describe(paired), flush=True)
    metrics = {
        "steps": trainer.state.global_step,
        "reward_trend": reward,
        "reward_paired": paired,
        "kl_last": trend(steps_csv, "kl").get("last"),
    }
    result = TrainResult(output_dir, adapter, output_dir / "model", metrics)
    facts = CardFacts(
        settings.algorithm,
        str(base_spec),
        settings=settings.model_dump(),
        data={"prompts practised on": len(prompts)},
        metrics={
            "steps": metrics["steps"],
            "reward_first": reward.get("first"),
            "reward_last": reward.get("last"),
            "kl_last": metrics["kl_last"],
        },
    )
    write_cards(result, facts)
    return result
