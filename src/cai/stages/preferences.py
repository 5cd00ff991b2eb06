"""Stage ``preferences``: preference pairs for the reward model / DPO, from one of three sources.

- ``judge``: two sampled answers of the SL model per prompt, labelled by the feedback model (cai.labeling);
- ``revision``: chosen = the SL revision, rejected = the initial answer (critique stage; no judge);
- ``contrastive``: chosen = answer under the constitution's system prompt, rejected = under its inverse's.

Writes data.jsonl (id, prompt, chosen, rejected, p_chosen, principles, swap_consistent, source), data.csv,
responses.jsonl (judge/contrastive samples) and diagnostics.json; resumes after a kill.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from typing import Any, Literal

from pydantic import Field

from cai.constitution import invert_constitution, load_constitution
from cai.errors import UserError
from cai.generation import generate_responses
from cai.labeling import (
    WEAK_SWAP_CONSISTENCY,
    LabelConfig,
    Pair,
    agreement_with_reference,
    check_labeler,
    label_diagnostics,
    label_in_batches,
    label_record,
    read_reference,
)
from cai.runs import read_jsonl, write_csv, write_json
from cai.stages.artifacts import principle_probabilities, read_prompts, sl_model_spec
from cai.tracking import Tracker

log = logging.getLogger(__name__)
CSV_FIELDS = ("id", "prompt", "chosen", "rejected", "p_chosen", "principles", "swap_consistent", "source")


class PreferencesConfig(LabelConfig):
    """Where pairs come from and how the judge labels them (label settings: see cai.labeling)."""

    source: Literal["judge", "revision", "contrastive"] = "judge"
    limit: int | None = Field(24, ge=1, description="red-team prompts used (null: all of the train split)")
    max_new_tokens: int = Field(64, ge=1, description="length of each sampled response")
    temperature: float = Field(1.0, gt=0, description="sampling temperature for the two responses")
    reference: str | None = Field(None, description="human-labelled pairs (.jsonl/.csv: prompt, chosen, rejected)")


def _sample(ctx, prompts, tags: dict[str, str | None], cfg: PreferencesConfig) -> dict[str, dict[str, str]]:
    """Generate one response per (prompt, tag) with the SL model, tag -> system prompt; returns id -> tag -> text."""
    backend = ctx.pool.get(sl_model_spec(ctx.run, ctx.config))
    base = ctx.config.generation.sampling(ctx.config.seed)
    out: dict[str, dict[str, str]] = {}
    with ctx.stage.writer("responses.jsonl") as w:
        for n, (tag, system) in enumerate(tags.items()):
            params = replace(
                base, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=ctx.config.seed + 1000 * n
            )
            generate_responses(
                backend,
                [replace(p, id=f"{p.id}/{tag}") for p in prompts],
                w,
                params,
                stage=ctx.stage,
                system_prompt=system,
                progress=ctx.progress,
                chunk=max(ctx.config.models.batch_size, 8),
                extra={"tag": tag},
            )
        for r in w.records:
            pid, tag = r["id"].rsplit("/", 1)
            out.setdefault(pid, {})[tag] = r["response"]
    return out


def _valid(ctx, pid: str, a: str, b: str) -> bool:
    """Pairs with an empty or identical response carry no preference: counted and skipped."""
    if not a.strip() or not b.strip():
        ctx.stage.skip(pid, "empty response")
        return False
    if a.strip() == b.strip():
        ctx.stage.skip(pid, "identical responses")
        return False
    return True


def _fixed_pairs(ctx, cfg: PreferencesConfig) -> list[dict]:
    """Pairs that need no judge (revision, contrastive): p_chosen = 1."""
    rows: list[tuple[str, str, str, str]] = []
    if cfg.source == "revision":
        for r in read_jsonl(ctx.run.artifact("critique", "data.jsonl")):
            if not r.get("changed"):
                ctx.stage.skip(r["id"], "revision did not change the answer")
            elif _valid(ctx, r["id"], r.get("final") or "", r.get("initial") or ""):
                rows.append((r["id"], r["prompt"], r["final"], r["initial"]))
    else:
        prompts = read_prompts(ctx.run)[: cfg.limit]
        const = load_constitution(ctx.config.constitution)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # dropped demonstrations do not matter here: only the system prompt
            inverse = invert_constitution(const).system_prompt
        texts = _sample(ctx, prompts, {"c": const.system_prompt, "x": inverse}, cfg)
        for p in prompts:
            t = texts.get(p.id, {})
            if _valid(ctx, p.id, t.get("c", ""), t.get("x", "")):
                rows.append((p.id, p.prompt, t["c"], t["x"]))
    return [
        {
            "id": i,
            "prompt": p,
            "chosen": c,
            "rejected": r,
            "p_chosen": 1.0,
            "principles": [],
            "swap_consistent": None,
            "source": cfg.source,
        }
        for i, p, c, r in rows
    ]


def _judge(ctx, cfg: PreferencesConfig, w) -> dict[str, Any]:
    const = load_constitution(ctx.config.constitution)
    check_labeler(cfg, const)  # a constitution the labeler cannot use fails before any work
    feedback = None  # the rules labeler asks no language model
    if cfg.labeler != "rules":
        feedback = ctx.pool.feedback()
        feedback.logprobs(["Answer: ("], [["A"]])  # fails fast with a clear error on servers without log-probs
    ref = read_reference(cfg.reference) if cfg.reference else []  # a bad file fails before any work
    prompts = read_prompts(ctx.run)[: cfg.limit]
    texts = _sample(ctx, prompts, {"a": None, "b": None}, cfg)
    pairs = []
    for p in prompts:
        t = texts.get(p.id, {})
        if p.id not in w and _valid(ctx, p.id, t.get("a", ""), t.get("b", "")):
            pairs.append(Pair(p.id, p.prompt, t["a"], t["b"]))
    by_id = {p.id: p for p in pairs}

    def write(labels):
        for lab in labels:
            w.write(label_record(lab, by_id[lab.id]))
        ctx.stage.save()

    _, pairs_per_s = label_in_batches(
        feedback,
        pairs,
        const,
        cfg,
        seed=ctx.config.seed,
        weights=principle_probabilities(ctx.run),
        progress=ctx.progress,
        on_batch=write,
    )
    out: dict[str, Any] = {"labelled_now": len(pairs), "pairs_per_s": round(pairs_per_s, 3)}
    if ref:
        agreement = agreement_with_reference(feedback, ref, const, cfg, seed=ctx.config.seed, progress=ctx.progress)
        (log.info if agreement["above_chance"] else log.warning)(agreement["verdict"])
        out["reference"] = agreement
    return out


def run(ctx) -> dict[str, Any]:
    cfg: PreferencesConfig = ctx.config.preferences
    with ctx.stage.writer("data.jsonl") as w:
        if cfg.source == "judge":
            extra = _judge(ctx, cfg, w)
        else:
            for row in _fixed_pairs(ctx, cfg):
                w.write(row)
            extra = {}
        rows = list(w.records)
    if not rows:
        raise UserError(
            f"preferences: no usable pairs ({len(ctx.stage.manifest['skipped'])} skipped, see "
            f"{ctx.stage.manifest_path}); raise preferences.limit or try another preferences.source"
        )
    write_csv(
        ctx.stage.file("data.csv"), [{**r, "principles": ";".join(r.get("principles") or [])} for r in rows], CSV_FIELDS
    )
    diag = {**label_diagnostics(rows), **extra}
    swap = diag.get("swap_consistency", {}).get("rate")
    if swap is not None and swap < WEAK_SWAP_CONSISTENCY:
        log.warning(
            "only %.0f%% of pairs keep their label when the options are swapped: the feedback model mostly "
            "answers by position. Use a stronger models.feedback or preferences.source revision/contrastive",
            100 * swap,
        )
    write_json(ctx.stage.file("diagnostics.json"), diag)
    counts = {
        "pairs": len(rows),
        "skipped": len(ctx.stage.manifest["skipped"]),
        "source": cfg.source,
        "swap_consistency": swap,
        "label_entropy_bits": diag.get("label_entropy_bits"),
        "pairs_per_s": extra.get("pairs_per_s"),
    }
    if "reference" in extra:
        counts["reference_agreement"] = extra["reference"]["agreement"]
    ctx.stage.finish(counts, diagnostics=diag)
    with Tracker(ctx.tracking) as tracker:
        tracker.log({"pairs": counts["pairs"], "skipped": counts["skipped"], "feedback": diag})
    return counts
