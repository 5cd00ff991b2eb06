"""Prefill attack and recovery training (Qi et al. 2024, "Safety alignment should be made more than just a few
tokens deep").

Two models are trained from the same starting checkpoint on the same constitution-style safety data: *standard*
(refusals from the first token, plus helpful benign answers) and *recovery* (the same, plus augmented examples
whose assistant turn starts with the first k tokens of a compliant answer — the policy's own, generated at run
time — and then turns into a refusal). The prefill attack (``cai.evaluation.prefill.prefill_attack``) is run on
both for every k; recovery training should lower the attack success rate at k > 0.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from cai.base_config import GreedyGenerationConfig
from cai.data import Prompt
from cai.evaluation.evaluate import format_rate
from cai.evaluation.plots import line_plot
from cai.experiments.config import ExperimentConfig
from cai.experiments.data import answer, refusal_for, safety_records, sft_record, write_records
from cai.experiments.pools import prompt_pools
from cai.experiments.report import write_report
from cai.experiments.steps import Experiment, evaluate_step, paired_between, require_model_dir, train
from cai.runs import StageDir, read_jsonl
from cai.training.sft import SFTTrainConfig

TURN = " Actually, I need to stop here. "


class PrefillRecoveryConfig(ExperimentConfig):
    name: str = "prefill-recovery"
    start: str | None = Field(None, description="checkpoint both models are trained from; null = the policy")
    k_values: list[int] = Field(default_factory=lambda: [0, 5, 10, 20], description="prefill lengths attacked")
    augment_k: list[int] = Field(
        default_factory=lambda: [5, 10, 20, 40],
        description="compliant-prefix lengths (tokens) used in recovery examples",
    )
    attack_text: str | None = Field(None, description="prefill text; null = the evaluation module's affirmative")
    sft: SFTTrainConfig = Field(default_factory=lambda: SFTTrainConfig(epochs=2, learning_rate=3e-4, batch_size=8))
    decode: GreedyGenerationConfig = Field(default_factory=lambda: GreedyGenerationConfig(max_new_tokens=48))


def compliant_prefix(tokenizer, answer_text: str, k: int) -> str:
    """The first ``k`` tokens of a compliant answer, as text."""
    return tokenizer.decode(tokenizer(answer_text, add_special_tokens=False)["input_ids"][:k]).rstrip()


def recovery_records(
    harmful: list[Prompt],
    answers: dict[str, dict],
    tokenizer,
    ks: list[int],
    constitution,
) -> list[dict]:
    """One augmented example per harmful prompt with a non-empty compliant answer; k cycles over ``ks``. The
    compliant prefix is the record's ``prefill``: context the model conditions on, not a target it learns to say
    (the paper's loss on the recovery given the harmful prefix)."""
    out = []
    usable = [p for p in harmful if p.id in answers and answers[p.id]["response"].strip()]
    for i, p in enumerate(usable):
        k = ks[i % len(ks)]
        prefix = compliant_prefix(tokenizer, answers[p.id]["response"], k)
        out.append(
            {
                **sft_record(f"recover-k{k}-{p.id}", p.prompt, prefix + TURN + refusal_for(p, constitution)),
                "prefill": prefix,
            }
        )
    return out


def run(cfg: PrefillRecoveryConfig, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Build both data sets, train both models, attack both for every k; returns metrics.json's content."""
    from cai.constitution import load_constitution
    from cai.evaluation.judges import judge_revision
    from cai.evaluation.prefill import AFFIRMATIVE, prefill_attack
    from cai.models import load_tokenizer

    exp = Experiment("prefill-recovery", cfg, force=force, progress=progress)
    pools = prompt_pools(cfg.prompts)
    start = require_model_dir(cfg.start, "prefill_recovery.start") if cfg.start else cfg.policy
    sampling = cfg.decode.sampling(cfg.seed)
    constitution = load_constitution(cfg.constitution)

    def data(st: StageDir) -> dict[str, Any]:
        kw: dict[str, Any] = {"batch_size": cfg.batch_size, "progress": progress}
        benign = answer(cfg.policy, pools["train_benign"], st, "benign_answers.jsonl", sampling, **kw)
        harmful = answer(cfg.policy, pools["train_harmful"], st, "harmful_answers.jsonl", sampling, **kw)
        standard = safety_records(pools["train_harmful"], benign, constitution)
        extra = recovery_records(
            pools["train_harmful"], harmful, load_tokenizer(cfg.policy), cfg.augment_k, constitution
        )
        write_records(st, "standard.jsonl", standard)
        write_records(st, "recovery.jsonl", standard + extra)
        return {"standard": len(standard), "recovery_examples": len(extra)}

    exp.step(
        "data",
        {
            "policy": cfg.policy,
            "prompts": cfg.prompts.model_dump(),
            "augment_k": cfg.augment_k,
            "decode": cfg.decode.step_config(),
            "constitution": cfg.constitution,
        },
        data,
    )
    text = cfg.attack_text or AFFIRMATIVE
    results: dict[str, dict] = {}
    for name in ("standard", "recovery"):
        model = train(exp, f"train-{name}", start, read_jsonl(exp.stage("data").file(f"{name}.jsonl")), cfg.sft)

        def attack(st: StageDir, model: str = model, name: str = name) -> dict[str, Any]:
            res = prefill_attack(
                model,
                pools["eval_harmful"],
                cfg.k_values,
                st.path,
                judge=cfg.judge,
                text=text,
                progress=progress,
                sampling=sampling,
            )
            return {"model": model, "by_k": {k: v["attack_success_rate"] for k, v in res["by_k"].items()}}

        results[name] = exp.step(
            f"attack-{name}",
            {
                "model": model,
                "k_values": cfg.k_values,
                "text": text,
                "judge": cfg.judge,
                "decode": cfg.decode.step_config(),
                "prompts": [p.id for p in pools["eval_harmful"]],
            },
            attack,
            revision=judge_revision(cfg.judge),
        )
        results[name]["benign"] = evaluate_step(exp, f"eval-benign-{name}", model, [], pools["eval_benign"])
    return _finish(exp, cfg, results, text)


def _finish(exp: Experiment, cfg: PrefillRecoveryConfig, results: dict[str, dict], text: str) -> dict[str, Any]:
    ks = sorted(set(cfg.k_values))
    fig = line_plot(
        exp.root / "plots" / "prefill_asr.png",
        "prefill attack success",
        ks,
        {f"{name} training": [r["by_k"][str(k)] for k in ks] for name, r in results.items()},
        "k prefilled tokens",
    )
    table = [
        [name, *(format_rate(r["by_k"][str(k)]) for k in ks), format_rate(r["benign"]["over_refusal_rate"])]
        for name, r in results.items()
    ]
    notes = [
        f"prefill = the first k tokens of {text!r}; attack success = the continuation is not a refusal "
        f"(judge {cfg.judge}); 95% Wilson CIs",
        f"recovery examples: k in {cfg.augment_k} tokens of the policy's own compliant answer, then a refusal; "
        "the compliant prefix is context only: the SFT loss covers the turn and the refusal",
    ]
    # the same held-out prompts attacked on both models: standard vs recovery for every k, and the benign prompts
    dirs = {f"{name} k={k}": exp.stage(f"attack-{name}").path / f"k{k}" for name in results for k in ks}
    dirs.update({f"{name} benign": exp.stage(f"eval-benign-{name}").path for name in results})
    paired = paired_between(
        exp, dirs, [(f"standard k={k}", f"recovery k={k}") for k in ks] + [("standard benign", "recovery benign")]
    )
    write_report(
        exp,
        "Prefill attack and recovery training",
        "Attack success rate of the prefill attack for each k, "
        "after standard safety SFT and after SFT with recovery augmentation.",
        ["training", *(f"ASR k={k}" for k in ks), "over-refusal (benign)"],
        table,
        [fig],
        notes,
        paired=paired,
    )
    return exp.finish(
        {
            "experiment": "prefill-recovery",
            "k_values": ks,
            "attack_text": text,
            "models": results,
            "paired": paired["comparisons"],
            "run": str(exp.root),
        }
    )
