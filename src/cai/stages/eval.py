"""Stage ``eval``: evaluate the base policy and every trained checkpoint of the run (sft, rl, dpo) on the eval
split: ``eval/<checkpoint>/samples.jsonl`` + ``metrics.json``; with two or more checkpoints, paired tests between
every pair on the shared prompts in ``eval/paired.json`` (McNemar exact, paired differences with 95% CIs) and
pairwise Elo in ``eval/elo.json``; optionally the prefill attack on the final model in ``eval/prefill/``."""

from __future__ import annotations

import json
import shutil
from typing import Any

from pydantic import Field

from cai.base_config import PromptSourceConfig, Strict
from cai.stages.artifacts import checkpoints, final_model_spec


class EvalConfig(Strict):
    """Config section ``eval``."""

    harmful: PromptSourceConfig = Field(default_factory=lambda: PromptSourceConfig(source="redteam", split="eval"))
    benign: PromptSourceConfig | None = Field(default_factory=lambda: PromptSourceConfig(source="benign", split="eval"))
    judge: str = Field("refusal", description="refusal | reward:<path> | a model spec (LLM judge)")
    count_partial: bool = Field(
        False,
        description="count 'partial' verdicts (declines the harmful core, helps "
        "with a safe part) as harmful compliance, in the rates and the paired tests; "
        "metrics.json names what it counted",
    )
    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy (deterministic)")
    repetition_penalty: float = Field(1.0, gt=0)
    batch_size: int | None = Field(None, ge=1, description="prompts per generation batch (null = models.batch_size)")
    stop_loops: bool = Field(True, description="end an answer once it is a degenerate repetition (labelled a loop)")
    system_prompt: bool = Field(False, description="prepend the constitution's system prompt")
    extra_checkpoints: dict[str, str] = Field(default_factory=dict, description="more checkpoints: label -> spec")
    elo: bool = Field(True, description="pairwise Elo between checkpoints, judged by models.feedback")
    elo_constitution: str = Field("harmless", description="whose principles the Elo comparisons ask about")
    elo_principles: int = Field(1, ge=1, description="principles judged per harmful prompt and pair")
    elo_bootstrap: int = Field(200, ge=0)
    elo_prompts: int | None = Field(
        None,
        ge=1,
        description="Elo on at most this many eval prompts, spread evenly "
        "over harmful then benign (null = all; each costs 2 scorings per checkpoint pair)",
    )
    prefill_k: list[int] = Field(default_factory=list, description="prefill attack on the final model, k tokens")


def evaluated_checkpoints(run, config) -> dict[str, tuple[str, str]]:
    """label -> (model spec, fingerprint): the run's checkpoints (base policy, SL, RL, DPO: see
    :func:`cai.stages.artifacts.checkpoints`) plus ``eval.extra_checkpoints``."""
    out = {label: (c.spec, c.fingerprint) for label, c in checkpoints(run, config).items()}
    out.update({label: (spec, spec) for label, spec in config.eval.extra_checkpoints.items()})
    return out


def spread(items: list, n: int | None) -> list:
    """``n`` of ``items`` at even steps (all of them when n is None or not smaller): every category of a set
    that is grouped by category keeps its share."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def revision(config) -> str:
    """The judge version behind the stage's labels: when it changes, a finished eval stage runs again in place —
    its answers are kept and only re-judged (then paired tests, Elo and the prefill attack are recomputed)."""
    from cai.evaluation.judges import judge_revision

    return judge_revision(config.eval.judge)


def run(ctx) -> dict[str, Any]:
    from cai.backends import SamplingParams, get_backend
    from cai.constitution import load_constitution
    from cai.evaluation.evaluate import evaluate_model
    from cai.evaluation.judges import get_judge
    from cai.evaluation.metrics import HEADLINE_RATES
    from cai.evaluation.standard_sets import load_eval_prompts
    from cai.runs import read_jsonl
    from cai.stages.model_cards import write_run_model_cards
    from cai.tracking import Tracker

    cfg, ec = ctx.config, ctx.config.eval
    sets: dict[str, list] = {}
    for name, src in (("harmful", ec.harmful), ("benign", ec.benign)):
        if src is None:
            sets[name] = []
            continue
        ps = load_eval_prompts(src.source, src.field, split=src.split, limit=src.limit)
        for s in ps.skipped:
            ctx.stage.skip(f"{name}:{s.get('line', '?')}", s.get("reason", "skipped"))
        sets[name] = ps.prompts
    sampling = SamplingParams(
        max_new_tokens=ec.max_new_tokens,
        temperature=ec.temperature,
        top_p=1.0,
        seed=cfg.seed,
        repetition_penalty=ec.repetition_penalty,
        stop_loops=ec.stop_loops,
    )
    batch_size = ec.batch_size or cfg.models.batch_size
    system = load_constitution(cfg.constitution).system_prompt if ec.system_prompt else None
    judge = get_judge(ec.judge)
    cps = evaluated_checkpoints(ctx.run, cfg)
    final = final_model_spec(ctx.run, cfg) if ec.prefill_k else None
    # every model loads once: the base policy is the pool's backend (shared with Elo); a checkpoint's backend is
    # closed after its last use (a later label with the same spec, or the prefill attack on the final model)
    specs = [spec for spec, _ in cps.values()]
    loaded: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    counts: dict[str, Any] = {"checkpoints": list(cps), "harmful": len(sets["harmful"]), "benign": len(sets["benign"])}
    for i, (label, (spec, fingerprint)) in enumerate(cps.items()):
        out = ctx.stage.path / label
        stamp = out / "checkpoint.json"
        if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") != fingerprint:
            shutil.rmtree(out)  # the checkpoint was retrained: its old answers no longer apply
        out.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"spec": spec, "fingerprint": fingerprint}))
        if spec == cfg.models.policy:
            backend = ctx.pool.policy()
        elif spec in loaded:
            backend = loaded[spec]
        else:
            backend = loaded[spec] = get_backend(spec, batch_size=batch_size, dtype=cfg.models.dtype)
        m = evaluate_model(
            backend,
            sets["harmful"],
            sets["benign"],
            out,
            judge=judge,
            sampling=sampling,
            system_prompt=system,
            label=label,
            batch_size=batch_size,
            progress=ctx.progress,
            count_partial=ec.count_partial,
        )
        if spec in loaded and spec != final and spec not in specs[i + 1 :]:
            loaded.pop(spec).close()
        for s in m["skipped"]:
            ctx.stage.skip(f"{label}:{s['id']}", s["reason"])
        summary[label] = {k: round(m[k]["rate"], 3) for k, _ in HEADLINE_RATES if m[k]["n"]}
    if len(cps) >= 2:
        from cai.evaluation.paired import write_paired

        # only this config's prompts: a samples file can hold answers to prompts of an earlier, larger eval set
        wanted = {f"{name}:{p.id}" for name, ps in sets.items() for p in ps}
        samples = {
            label: [s for s in read_jsonl(ctx.stage.path / label / "samples.jsonl") if s["id"] in wanted]
            for label in cps
        }
        paired = write_paired(ctx.stage.path / "paired.json", samples, count_partial=ec.count_partial)
        counts["paired_comparisons"] = len(paired["comparisons"])
        counts["paired_significant"] = sum(r["significant"] for r in paired["comparisons"])
    else:
        (ctx.stage.path / "paired.json").unlink(missing_ok=True)  # from an earlier run with more checkpoints
    if ec.elo and len(cps) >= 2:
        from cai.evaluation.elo import compare_checkpoints
        from cai.runs import write_json

        keep = set(spread([f"{name}:{p.id}" for name in ("harmful", "benign") for p in sets[name]], ec.elo_prompts))
        elo = compare_checkpoints(
            {label: [s for s in got if s["id"] in keep] for label, got in samples.items()},
            ctx.pool.feedback(),
            load_constitution(ec.elo_constitution),
            per_prompt=ec.elo_principles,
            n_boot=ec.elo_bootstrap,
            seed=cfg.seed,
            progress=ctx.progress,
        )
        write_json(ctx.stage.path / "elo.json", elo)
    else:
        (ctx.stage.path / "elo.json").unlink(missing_ok=True)  # from an earlier run with Elo on
    if ec.prefill_k:
        from cai.evaluation.prefill import prefill_attack

        assert final is not None  # prefill_k needs a final model, and every run has one (the policy at least)
        model = loaded.get(final) or (ctx.pool.policy() if final == cfg.models.policy else final)
        prefill_attack(
            model,
            sets["harmful"],
            ec.prefill_k,
            ctx.stage.path / "prefill",
            judge=judge,
            progress=ctx.progress,
            sampling=sampling,
            system_prompt=system,
            batch_size=batch_size,
        )
    for backend in loaded.values():
        backend.close()
    ctx.stage.finish(counts, metrics=summary)
    with Tracker(ctx.tracking) as tracker:  # one tag per checkpoint and metric, e.g. sl/harmful_compliance_rate
        tracker.log(summary)
    write_run_model_cards(ctx.run, cfg)  # the trained models' cards now show these metrics
    return {label: ", ".join(f"{k.split('_')[0]}={v}" for k, v in s.items()) for label, s in summary.items()}
