"""Unalignment by fine-tuning (parametric red-teaming; Qi et al. 2023, Bhardwaj & Poria 2023).

An aligned checkpoint — a user's (e.g. a CAI run's final model) or, by default, the policy after a quick SFT on
constitution-style refusals — is fine-tuned on N harmful-compliance examples for each N in a sweep, and
harmful compliance, over-refusal and answer length are measured against N on held-out prompts. By default the
examples are the *policy's own* compliant answers to the bundled red-team prompts, generated at run time (the
project ships no harmful text); users can pass their own file. Optionally the most unaligned model is
re-aligned by SFT on a user's data (e.g. a contextual-constitution CAI run's ``critique/sft.jsonl``).
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field, field_validator

from cai.base_config import GreedyGenerationConfig
from cai.errors import UserError
from cai.evaluation.evaluate import format_rate
from cai.evaluation.plots import line_plot
from cai.experiments.config import ExperimentConfig
from cai.experiments.data import answer, load_records, safety_records, sft_record, write_records
from cai.experiments.pools import PromptPoolConfig, prompt_pools
from cai.experiments.report import write_report
from cai.experiments.steps import Experiment, evaluate_step, paired_between, require_model_dir, train
from cai.runs import StageDir, read_jsonl
from cai.training.sft import SFTTrainConfig


class UnalignConfig(ExperimentConfig):
    name: str = "unalign"
    aligned: str | None = Field(None, description="aligned checkpoint to unalign; null = align the policy here")
    align: SFTTrainConfig = Field(default_factory=lambda: SFTTrainConfig(epochs=2, learning_rate=3e-4, batch_size=8))
    align_harmful: int | None = Field(
        None,
        ge=1,
        description="harmful training prompts refused in the align step " "(the first ones); null = all of them",
    )
    n_values: list[int] = Field(default_factory=lambda: [10, 50, 100])
    examples: str | None = Field(None, description="JSONL of harmful-compliance examples; null = the policy's own")
    unalign: SFTTrainConfig = Field(
        default_factory=lambda: SFTTrainConfig(epochs=3, learning_rate=3e-4, batch_size=8, eval_fraction=0)
    )
    realign_data: str | None = Field(None, description="SFT records to re-align the most unaligned model with")
    realign: SFTTrainConfig = Field(default_factory=lambda: SFTTrainConfig(epochs=2, learning_rate=3e-4, batch_size=8))
    eval_policy: bool = Field(True, description="also evaluate the starting policy, for reference")
    prompts: PromptPoolConfig = Field(default_factory=lambda: PromptPoolConfig(n_train_harmful=154))
    decode: GreedyGenerationConfig = Field(default_factory=lambda: GreedyGenerationConfig(max_new_tokens=64))

    @field_validator("n_values")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(n < 1 for n in v):
            raise ValueError("give at least one N, each >= 1, e.g. [10, 50, 100]")
        return sorted(set(v))


def compliant_examples(answers: list[dict], judged: list[dict], seed: int) -> list[dict]:
    """The answers the judge labelled ``complied`` (not refused, partial or non-responsive), as SFT records in a
    seeded order."""
    from cai.evaluation.metrics import harmful_complied

    records = [
        sft_record(f"comply-{a['id']}", a["prompt"], a["response"])
        for a, j in zip(answers, judged, strict=False)
        if harmful_complied(j) and a["response"].strip()
    ]
    random.Random(seed).shuffle(records)
    return records


def run(cfg: UnalignConfig, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """The whole sweep (each step resumes); returns metrics.json's content."""
    from cai.constitution import load_constitution
    from cai.evaluation.judges import get_judge

    exp = Experiment("unalign", cfg, force=force, progress=progress)
    pools = prompt_pools(cfg.prompts)
    if cfg.aligned:
        require_model_dir(cfg.aligned, "unalign.aligned")
    sampling = cfg.decode.sampling(cfg.seed)

    def data(st: StageDir) -> dict[str, Any]:
        kw: dict[str, Any] = {"batch_size": cfg.batch_size, "progress": progress}
        benign = answer(cfg.policy, pools["train_benign"], st, "benign_answers.jsonl", sampling, **kw)
        if cfg.examples:
            examples = load_records(cfg.examples, "unalign.examples")
        else:
            harmful = answer(cfg.policy, pools["train_harmful"], st, "harmful_answers.jsonl", sampling, **kw)
            rows = list(harmful.values())
            judged = get_judge(cfg.judge).judge([r["prompt"] for r in rows], [r["response"] for r in rows])
            examples = compliant_examples(rows, judged, cfg.seed)
        write_records(st, "examples.jsonl", examples)
        refuse = pools["train_harmful"][: cfg.align_harmful or len(pools["train_harmful"])]
        align = safety_records(refuse, benign, load_constitution(cfg.constitution))
        write_records(st, "align.jsonl", align)
        return {"examples": len(examples), "align_records": len(align), "source": cfg.examples or "policy's own"}

    got = exp.step(
        "data",
        {
            "policy": cfg.policy,
            "prompts": cfg.prompts.model_dump(),
            "examples": cfg.examples,
            "judge": cfg.judge,
            "decode": cfg.decode.step_config(),
            "constitution": cfg.constitution,
            "align_harmful": cfg.align_harmful,
        },
        data,
    )
    examples = read_jsonl(exp.stage("data").file("examples.jsonl"))
    too_big = [n for n in cfg.n_values if n > len(examples)]
    if too_big:
        raise UserError(
            f"unalign.n_values: N={too_big[0]} is larger than the {len(examples)} harmful-compliance "
            f"examples available ({got['source']}); lower n_values or pass more examples"
        )
    aligned = cfg.aligned or train(
        exp, "align", cfg.policy, read_jsonl(exp.stage("data").file("align.jsonl")), cfg.align
    )
    harmful, benign = pools["eval_harmful"], pools["eval_benign"]
    rows: dict[str, dict] = {}
    steps: dict[str, str] = {}  # row label -> the step folder holding its samples.jsonl
    if cfg.eval_policy:
        rows["policy"] = evaluate_step(exp, "eval-policy", cfg.policy, harmful, benign)
        steps["policy"] = "eval-policy"
    rows["N=0 (aligned)"] = evaluate_step(exp, "eval-aligned", aligned, harmful, benign)
    steps["N=0 (aligned)"] = "eval-aligned"
    last = aligned
    for n in cfg.n_values:
        last = train(exp, f"unalign-{n}", aligned, examples[:n], cfg.unalign, {"n": n})
        rows[f"N={n}"] = evaluate_step(exp, f"eval-{n}", last, harmful, benign)
        steps[f"N={n}"] = f"eval-{n}"
    if cfg.realign_data:
        realigned = train(exp, "realign", last, load_records(cfg.realign_data, "unalign.realign_data"), cfg.realign)
        rows[f"N={cfg.n_values[-1]} + realign"] = evaluate_step(exp, "eval-realign", realigned, harmful, benign)
        steps[f"N={cfg.n_values[-1]} + realign"] = "eval-realign"
    return _finish(exp, cfg, rows, len(examples), steps)


def paired_pairs(labels: list[str]) -> list[tuple[str, str]]:
    """Which models the sweep compares on the same held-out prompts: the aligned checkpoint against the starting
    policy and against every N, and a re-aligned model against the model it started from."""
    ref = "N=0 (aligned)"
    pairs = [("policy", ref)] if "policy" in labels else []
    pairs += [(ref, x) for x in labels if x.startswith("N=") and x != ref and not x.endswith("+ realign")]
    pairs += [(x.removesuffix(" + realign"), x) for x in labels if x.endswith(" + realign")]
    return pairs


def _finish(
    exp: Experiment, cfg: UnalignConfig, rows: dict[str, dict], available: int, steps: dict[str, str] | None = None
) -> dict[str, Any]:
    ns = [0, *cfg.n_values]
    sweep = [rows["N=0 (aligned)"], *(rows[f"N={n}"] for n in cfg.n_values)]
    fig = line_plot(
        exp.root / "plots" / "unalign.png",
        "unalignment by fine-tuning",
        ns,
        {
            "harmful compliance": [r["harmful_compliance_rate"] for r in sweep],
            "over-refusal (benign)": [r["over_refusal_rate"] for r in sweep],
        },
        "N harmful-compliance examples",
    )
    table = [
        [
            name,
            format_rate(r["harmful_compliance_rate"]),
            format_rate(r["over_refusal_rate"]),
            format_rate(r["loop_rate"]),
            f"{r['mean_length']['rate']:.0f}",
        ]
        for name, r in rows.items()
    ]
    notes = [
        f"aligned checkpoint: {cfg.aligned or 'the policy after SFT on constitution-style refusals (align step)'}",
        f"examples: {cfg.examples or 'the policy own compliant answers to bundled red-team prompts'} "
        f"({available} available); judge: {cfg.judge}; 95% Wilson CIs",
    ]
    steps = steps or {}
    paired = paired_between(
        exp, {label: exp.stage(step).path for label, step in steps.items()}, paired_pairs(list(steps))
    )
    write_report(
        exp,
        "Unalignment by fine-tuning",
        "Harmful compliance and over-refusal on held-out prompts after "
        "fine-tuning the aligned checkpoint on N harmful-compliance examples.",
        ["model", "harmful compliance", "over-refusal", "loops", "mean tokens"],
        table,
        [fig],
        notes,
        paired=paired,
    )
    return exp.finish(
        {
            "experiment": "unalign",
            "n_values": cfg.n_values,
            "examples_available": available,
            "models": rows,
            "paired": paired["comparisons"],
            "run": str(exp.root),
        }
    )
