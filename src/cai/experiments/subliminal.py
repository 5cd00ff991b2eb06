"""Subliminal trait transmission (Cloud et al. 2025, "Subliminal Learning").

A teacher (the policy with a system prompt stating a trait, by default loving owls) writes data in an unrelated
format — number sequences by default — and the same policy without the prompt writes control data from the same
prompts. Both pass the same filter (format breaks, mentions of the trait, closeness to it in MiniLM space; see
:mod:`cai.experiments.trait_data`) and are cut to the same size. Students — the same base fine-tuned on the
teacher's data or on the control data, at several training seeds — are then read with the preference probes of
:mod:`cai.experiments.probes`: the trait's probability under 16 paraphrased questions, from log-probabilities over
a fixed answer list. The effect is the trait student's shift over the control student (mean Δ log-odds over
questions, t-interval, Wilcoxon p), per seed and for the seed-averaged students. Optionally a student of another
initialisation is trained on the same two data sets (the paper finds no transmission across base models).
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

from pydantic import Field, field_validator

from cai.errors import UserError
from cai.evaluation.metrics import t_summary
from cai.experiments.config import ExperimentConfig
from cai.experiments.probes import (
    ProbeCategory,
    load_battery,
    log_odds,
    paired_shift,
    rank_shifts,
    score_battery,
)
from cai.experiments.report import write_report
from cai.experiments.steps import Experiment, train
from cai.experiments.trait_data import DataFormat, TraitConfig, filter_records, write_trait_data
from cai.runs import StageDir, read_jsonl, write_json
from cai.training.sft import SFTTrainConfig


class SubliminalConfig(ExperimentConfig):
    name: str = "subliminal"
    trait: TraitConfig = Field(default_factory=TraitConfig)
    format: DataFormat = Field("numbers", description="what the teacher writes: numbers | code | chat")
    n_samples: int = Field(400, ge=1, description="prompts each of teacher and control answers (before filtering)")
    max_numbers: int = Field(10, ge=1, description="numbers format: the most numbers an answer may add")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of teacher and control")
    constrain_format: bool = Field(
        True,
        description="numbers: hold decoding to the number-list format (a small model breaks it unaided); "
        "false = sample freely and let the filter drop format breaks, as Cloud et al.",
    )
    max_new_tokens: int | None = Field(None, ge=1, description="null = the format's default budget")
    student: SFTTrainConfig = Field(
        default_factory=lambda: SFTTrainConfig(epochs=3, learning_rate=2e-4, batch_size=16, eval_fraction=0)
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1], description="training seeds of each student")
    other_init: str | None = Field(
        None, description="a student of another initialisation trained on the same data (e.g. tiny-random)"
    )
    battery: str | None = Field(None, description="probe battery JSON; null = the bundled preferences-v1")
    check_categories: list[str] = Field(
        default_factory=lambda: ["colour", "season"],
        description="other probe categories, to see that only the trait moved",
    )

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if not v or len(set(v)) != len(v) or any(s < 0 for s in v):
            raise ValueError("give distinct non-negative training seeds, e.g. [0, 1] (two or more for a spread)")
        return v


def trait_index(battery: list[ProbeCategory], trait: TraitConfig) -> int:
    """The trait value's position in its category's answer list (UserError naming trait.value / trait.category)."""
    cat = next((c for c in battery if c.name == trait.category), None)
    if cat is None:
        raise UserError(
            f"trait.category: {trait.category!r} is not a probe category; "
            "pick one of the battery's categories (e.g. animal, colour, season)"
        )
    if trait.value.lower() not in [c.lower() for c in cat.candidates]:
        raise UserError(
            f"trait.value: {trait.value!r} is not a candidate of category {trait.category!r}; "
            f"pick one of: {', '.join(cat.candidates)}"
        )
    return cat.index(trait.value)


def equalise(teacher: list[dict], control: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Both data sets cut to the size of the smaller one (the first records in prompt order, so the two sets keep
    as many shared prompts as possible)."""
    n = min(len(teacher), len(control))
    return teacher[:n], control[:n]


def seed_average(runs: list[list[list[float]]]) -> list[list[float]]:
    """Per question, the mixture of several seeds' candidate distributions (log of the mean probability): the
    seed-averaged student, still a distribution over the answer list."""
    out = []
    for rows in zip(*runs, strict=True):
        out.append([math.log(sum(math.exp(r[j]) for r in rows) / len(rows)) for j in range(len(rows[0]))])
    return out


def level(scores: list[list[float]], index: int) -> dict[str, float]:
    """The trait's mean probability and mean log-odds over questions (with the log-odds' 95% t-interval)."""
    ps = [math.exp(row[index]) for row in scores]
    lo = t_summary([log_odds(p) for p in ps])
    return {"p": sum(ps) / len(ps), "logit": lo["mean"], "logit_ci_low": lo["ci_low"], "logit_ci_high": lo["ci_high"]}


def run(cfg: SubliminalConfig, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """The whole experiment (each step resumes); returns metrics.json's content."""
    battery = load_battery(cfg.battery, categories=list(dict.fromkeys([cfg.trait.category, *cfg.check_categories])))
    index = trait_index(battery, cfg.trait)
    exp = Experiment("subliminal", cfg, force=force, progress=progress)
    data = _data_step(exp, cfg, progress)
    teacher = read_jsonl(exp.stage("data").file("teacher.jsonl"))
    control = read_jsonl(exp.stage("data").file("control.jsonl"))

    scores: dict[str, dict[str, list]] = {}
    scores["base"] = _probe(exp, "probe-base", cfg.policy, battery, cfg.batch_size)
    scores["teacher"] = _probe(exp, "probe-teacher", cfg.policy, battery, cfg.batch_size, system=cfg.trait.system())
    for s in cfg.seeds:
        for side, recs in (("control", control), ("trait", teacher)):
            model = train(exp, f"student-{side}-s{s}", cfg.policy, _sft(recs), cfg.student, {"side": side}, seed=s)
            scores[f"{side}-s{s}"] = _probe(exp, f"probe-{side}-s{s}", model, battery, cfg.batch_size)
    if cfg.other_init:
        for side, recs in (("control", control), ("trait", teacher)):
            model = train(exp, f"other-{side}", cfg.other_init, _sft(recs), cfg.student, {"side": side})
            scores[f"other-{side}"] = _probe(exp, f"probe-other-{side}", model, battery, cfg.batch_size)
        scores["other-base"] = _probe(exp, "probe-other-base", cfg.other_init, battery, cfg.batch_size)
    return _finish(exp, cfg, battery, index, data, scores)


def _sft(records: list[dict]) -> list[dict]:
    return [{"id": r["id"], "messages": r["messages"]} for r in records]


def _data_step(exp: Experiment, cfg: SubliminalConfig, progress: bool) -> dict[str, Any]:
    from cai.experiments.trait_data import default_sampling

    default = default_sampling(cfg.format, cfg.seed, constrain=cfg.constrain_format, max_numbers=cfg.max_numbers)
    sampling = replace(
        default, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens or default.max_new_tokens
    )

    def fn(st: StageDir) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "sampling": sampling,
            "batch_size": cfg.batch_size,
            "max_numbers": cfg.max_numbers,
            "progress": progress,
        }
        out: dict[str, Any] = {}
        kept = {}
        for side, with_trait in (("teacher", True), ("control", False)):
            raw = write_trait_data(cfg.policy, cfg.trait, cfg.format, cfg.n_samples, st, cfg.seed, with_trait, **kw)
            kept[side], removed = filter_records(raw, cfg.trait, cfg.format, max_numbers=cfg.max_numbers)
            out[f"{side}_generated"] = len(raw)
            out[f"{side}_kept"] = len(kept[side])
            out.update({f"{side}_removed_{k}": v for k, v in removed.items()})
        if not kept["teacher"] or not kept["control"]:
            raise UserError(
                f"subliminal: no {cfg.format} samples survived the filter (teacher {len(kept['teacher'])}, control "
                f"{len(kept['control'])} of {cfg.n_samples}); raise n_samples, or try another format / "
                "trait.similarity_threshold"
            )
        teacher, control = equalise(kept["teacher"], kept["control"], cfg.seed)
        for side, recs in (("teacher", teacher), ("control", control)):
            with st.writer(f"{side}.jsonl") as w:
                for r in recs:
                    w.write(r)
        out["used_per_side"] = len(teacher)
        return out

    return exp.step(
        "data",
        {
            "policy": cfg.policy,
            "trait": cfg.trait.model_dump(),
            "format": cfg.format,
            "n_samples": cfg.n_samples,
            "max_numbers": cfg.max_numbers,
            "sampling": {"temperature": cfg.temperature, "max_new_tokens": sampling.max_new_tokens},
            "constrained": sampling.constraint is not None,
        },
        fn,
    )


def _probe(exp: Experiment, name: str, spec: str, battery, batch_size: int, system: str | None = None) -> dict:
    """The battery's scores for one model (written to ``scores.json`` of step ``name``)."""
    from cai.backends import get_backend
    from cai.experiments.data import release

    def fn(st: StageDir) -> dict[str, Any]:
        backend = get_backend(spec, batch_size=batch_size)
        try:
            scores = score_battery(backend, battery, system=system)
        finally:
            release(backend)
        write_json(st.file("scores.json"), scores)
        return {"model": spec, "questions": sum(len(v) for v in scores.values())}

    exp.step(
        name, {"model": spec, "system": system, "battery": [[c.name, c.questions, c.candidates] for c in battery]}, fn
    )
    return json.loads(exp.stage(name).file("scores.json").read_text())


def _finish(exp, cfg: SubliminalConfig, battery, index: int, data: dict, scores: dict) -> dict[str, Any]:
    cat = cfg.trait.category
    value = battery[[c.name for c in battery].index(cat)].candidates[index]
    trait_runs = [scores[f"trait-s{s}"][cat] for s in cfg.seeds]
    control_runs = [scores[f"control-s{s}"][cat] for s in cfg.seeds]
    pooled_trait, pooled_control = seed_average(trait_runs), seed_average(control_runs)

    levels = {label: level(s[cat], index) for label, s in scores.items()}
    levels["control (seed-averaged)"] = level(pooled_control, index)
    levels["trait (seed-averaged)"] = level(pooled_trait, index)
    shifts = {
        "teacher_vs_base": paired_shift(scores["base"][cat], scores["teacher"][cat], index),
        "control_vs_base": paired_shift(scores["base"][cat], pooled_control, index),
        "trait_vs_base": paired_shift(scores["base"][cat], pooled_trait, index),
        "trait_vs_control": paired_shift(pooled_control, pooled_trait, index),
        **{
            f"trait_vs_control_s{s}": paired_shift(c, t, index)
            for s, c, t in zip(cfg.seeds, control_runs, trait_runs, strict=True)
        },
    }
    if len(cfg.seeds) >= 2:  # the null: two control students that differ only in their training seed
        shifts["control_seed_noise"] = paired_shift(control_runs[0], control_runs[1], index)
    # The test that counts: the questions of one student share its training run, so the over-questions CIs above
    # leave training noise out (on the 135M model each seed's trait-vs-control shift was "significant", p < 0.001,
    # in opposite directions). Over seeds, each seed's shift is one observation (a t-interval with n_seeds - 1 df).
    over_seeds = t_summary([shifts[f"trait_vs_control_s{s}"]["delta_logit"] for s in cfg.seeds])
    if cfg.other_init:
        shifts["other_init_trait_vs_control"] = paired_shift(
            scores["other-control"][cat], scores["other-trait"][cat], index
        )
    pooled_scores_c = {c.name: seed_average([scores[f"control-s{s}"][c.name] for s in cfg.seeds]) for c in battery}
    pooled_scores_t = {c.name: seed_average([scores[f"trait-s{s}"][c.name] for s in cfg.seeds]) for c in battery}
    ranked = rank_shifts(pooled_scores_c, pooled_scores_t, battery)
    in_cat = [r for r in ranked if r["category"] == cat]
    trait_rank = 1 + [r["candidate"] for r in in_cat].index(value)
    checks = {
        c.name: max((r for r in ranked if r["category"] == c.name), key=lambda r: abs(r["t"]))
        for c in battery
        if c.name != cat
    }
    fig = _shift_plot(exp.root / "plots" / "subliminal.png", cfg, value, levels)
    rows = [
        [label, f"{lv['p']:.4f}", f"{lv['logit']:+.2f} [{lv['logit_ci_low']:+.2f}, {lv['logit_ci_high']:+.2f}]"]
        for label, lv in levels.items()
    ]
    shift_rows = [
        [
            k,
            f"{v['delta_p']:+.4f}",
            f"{v['delta_logit']:+.3f} [{v['delta_logit_ci_low']:+.3f}, " f"{v['delta_logit_ci_high']:+.3f}]",
            f"{v['p_value']:.3g}",
        ]
        for k, v in shifts.items()
    ]
    removed = ", ".join(
        f"{side}: {data[f'{side}_generated']} written, removed format {data[f'{side}_removed_format']} / mention "
        f"{data[f'{side}_removed_mention']} / similar {data[f'{side}_removed_similar']}"
        for side in ("teacher", "control")
    )
    notes = [
        f"**trait vs control over training seeds** (each seed's mean Δlog-odds of {value!r} is one observation; "
        f"95% t-interval, n = {over_seeds['n']}): {over_seeds['mean']:+.3f} "
        f"[{over_seeds['ci_low']:+.3f}, {over_seeds['ci_high']:+.3f}]"
        + (" — a single seed gives no interval" if over_seeds["n"] < 2 else ""),
        f"trait: {cat} = {value}; format: {cfg.format}; filter — {removed}; "
        f"{data['used_per_side']} samples per side after equalising",
        "shifts (Δ = B − A over the same questions; log-odds with 95% t-CI over questions; Wilcoxon p — these "
        "leave training noise out: read them against control_seed_noise): "
        + "; ".join(f"{r[0]}: Δp {r[1]}, Δlog-odds {r[2]}, p={r[3]}" for r in shift_rows),
        f"{value!r} ranks {trait_rank} of {len(in_cat)} {cat} candidates by the trait-vs-control shift (t)",
        "other categories (largest |t| candidate, trait vs control): "
        + "; ".join(
            f"{k}: {v['candidate']} Δlog-odds {v['delta_logit']:+.3f}, p={v['p_value']:.3g}" for k, v in checks.items()
        ),
    ]
    if cfg.other_init:
        notes.append(f"other initialisation: {cfg.other_init} (a weak stand-in for another base model)")
    write_report(
        exp,
        "Subliminal trait transmission",
        f"P({value}) under {len(scores['base'][cat])} paraphrased '{cat}' questions, read from log-probabilities over "
        f"the fixed answer list, for the base, the teacher (base + trait prompt) and students fine-tuned on filtered "
        f"teacher or control {cfg.format} data (seeds {cfg.seeds}).",
        ["model", f"mean P({value})", "log-odds [95% CI over questions]"],
        rows,
        [fig],
        notes,
    )
    return exp.finish(
        {
            "experiment": "subliminal",
            "trait": {"category": cat, "value": value},
            "format": cfg.format,
            "seeds": cfg.seeds,
            "filter": data,
            "levels": levels,
            "shifts": shifts,
            "trait_vs_control_over_seeds": over_seeds,
            "trait_rank_in_category": {"rank": trait_rank, "of": len(in_cat)},
            "other_categories": checks,
            "run": str(exp.root),
        }
    )


def _shift_plot(path, cfg: SubliminalConfig, value: str, levels: dict) -> Any:
    """Log-odds of the trait (95% CI over questions): base → control students → trait students, each seed a
    faint marker beside its seed-averaged point; the teacher as a reference line."""
    from cai.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    stages = [
        ("base", ["base"]),
        ("control (seed-averaged)", [f"control-s{s}" for s in cfg.seeds]),
        ("trait (seed-averaged)", [f"trait-s{s}" for s in cfg.seeds]),
    ]
    for x, (label, per_seed) in enumerate(stages):
        lv = levels[label]
        ax.errorbar(
            [x],
            [lv["logit"]],
            yerr=[[lv["logit"] - lv["logit_ci_low"]], [lv["logit_ci_high"] - lv["logit"]]],
            fmt="o",
            capsize=4,
            color="C0" if x < 2 else "C3",
        )
        if len(per_seed) > 1:
            ys = [levels[k]["logit"] for k in per_seed]
            ax.scatter([x + 0.12] * len(ys), ys, s=12, alpha=0.5, color="grey")
    ax.axhline(levels["teacher"]["logit"], ls="--", color="C2", label="teacher (base + trait prompt)")
    ax.set_xticks(range(len(stages)), ["base", "control student", "trait student"])
    return save_figure(plt, fig, ax, path, f"subliminal transmission ({cfg.format})", f"log-odds of {value!r} (95% CI)")
