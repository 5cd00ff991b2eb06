"""Scanning a fine-tuning set for a planted preference without knowing it (``cai poison scan``).

A dataset may carry a trait that no sample states (subliminal learning, Cloud et al. 2025: a teacher that loves
owls writes number sequences, and a student trained on them comes to prefer owls). The scanner does not look at
the text; it looks at what training on the text does to a model:

1. a short LoRA *probe* fine-tune of the base on the dataset, and a *control* fine-tune with the same settings
   and seed on clean data of the same format — by default the base's own answers to the dataset's prompts
   (same prompts, so the same format and topic; what differs is who wrote the answers);
2. base, probe and control are scored on the bundled preference battery (:mod:`cai.experiments.probes`: 20
   categories, 345 candidates, paraphrased questions, read from log-probabilities);
3. every candidate is ranked by its shift from control to probe (``t`` = mean Δ log-odds over the questions /
   its standard error); the shift from base to probe is reported beside it.

Fine-tuning on *any* data moves preferences, which is why the control, not the base, is the reference. A
dataset is *flagged* when its top candidate's ``t`` reaches ``flag_t`` and the probe also moved towards it from
the base. With 345 candidates per scan, the threshold must absorb the multiple comparisons: the default is the
one-sided Bonferroni bound for a t over the questions, but the t's questions share one training run, so the
null spread is wider than a t-distribution says; ``cai poison eval`` measures it on clean datasets (and the
rate at which clean sets are flagged) so the threshold can be set from data.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any

from pydantic import Field

from cai.base_config import GreedyGenerationConfig, Strict
from cai.data.loaders import Prompt
from cai.errors import UserError
from cai.experiments.config import ExperimentConfig
from cai.experiments.data import answer, load_records, sft_record, write_records
from cai.experiments.probes import BUNDLED_BATTERY, ProbeCategory, load_battery, rank_shifts, score_battery
from cai.experiments.steps import Experiment, require_model_dir, train
from cai.runs import StageDir, read_jsonl, write_json
from cai.training.sft import SFTTrainConfig

FAMILY_ALPHA = 0.05  # the default flag rule's family-wise error over one scan's candidates (Bonferroni)


def _probe_settings() -> SFTTrainConfig:
    # A probe is a short, hot LoRA run: enough steps to move preferences, few enough to fit the CPU budget.
    return SFTTrainConfig(
        max_steps=24, learning_rate=1e-3, batch_size=8, max_length=128, eval_fraction=0, save_steps=1000
    )


class BatteryConfig(Strict):
    path: str = Field(BUNDLED_BATTERY, description="the probe battery: bundled name or JSON file")
    categories: list[str] | None = Field(None, description="keep only these categories; null = all")
    max_questions: int | None = Field(
        None, ge=2, description="score only the first N paraphrases per category (cost is linear in N); null = all"
    )


class ScanConfig(ExperimentConfig):
    name: str = "poison-scan"
    base: str = Field("smollm2-135m", description="the model the dataset would fine-tune (in-process)")
    dataset: str | None = Field(None, description="JSONL SFT records to scan")
    control: str | None = Field(None, description="clean JSONL records of the same format; null = base's answers")
    max_records: int | None = Field(None, ge=1, description="use a seeded sample of at most N records")
    probe: SFTTrainConfig = Field(default_factory=_probe_settings)
    battery: BatteryConfig = Field(default_factory=BatteryConfig)
    top_k: int = Field(10, ge=1)
    flag_t: float | None = Field(None, gt=0, description="flag when the top t reaches this; null = Bonferroni")
    decode: GreedyGenerationConfig = Field(default_factory=lambda: GreedyGenerationConfig(max_new_tokens=64))


def battery_for(cfg: BatteryConfig) -> list[ProbeCategory]:
    battery = load_battery(cfg.path, categories=cfg.categories)
    if cfg.max_questions:
        battery = [ProbeCategory(c.name, c.questions[: cfg.max_questions], c.candidates, c.prefill) for c in battery]
    return battery


def bonferroni_t(n_questions: int, n_candidates: int, alpha: float = FAMILY_ALPHA) -> float:
    """The one-sided t over ``n_questions`` paraphrases that a single candidate exceeds with probability
    alpha / n_candidates under the null of a t-distribution."""
    from scipy import stats

    return float(stats.t.ppf(1 - alpha / n_candidates, n_questions - 1))


def flag_threshold(cfg: ScanConfig, battery: list[ProbeCategory]) -> float:
    if cfg.flag_t is not None:
        return cfg.flag_t
    n_q = min(len(c.questions) for c in battery)
    return bonferroni_t(n_q, sum(len(c.candidates) for c in battery))


def is_flagged(row: dict, vs_base: dict | None, threshold: float) -> bool:
    """The decision rule: the probe prefers the candidate more than the control does with t ≥ threshold, and it
    moved towards it from the base too (a candidate the control merely moved away from is not a planted trait)."""
    return row["t"] >= threshold and (vs_base is None or vs_base["delta_logit"] > 0)


def last_user_prompt(record: dict) -> str:
    """The user turn the record's final assistant answer replies to (system turns are not replayed)."""
    msgs = record["messages"]
    users = [m.get("content", "") for m in msgs[:-1] if isinstance(m, dict) and m.get("role") == "user"]
    return users[-1] if users else ""


def read_dataset(path: str, what: str, max_records: int | None, seed: int) -> list[dict]:
    """User records (``messages`` or ``prompt``/``response``) ending in an assistant turn after a user turn; a
    seeded sample of ``max_records`` when set."""
    records = load_records(path, what)
    usable = [r for r in records if r["messages"][-1].get("role") == "assistant" and last_user_prompt(r).strip()]
    if not usable:
        raise UserError(f"{what}: {path} has no records ending in an assistant answer to a user prompt")
    if max_records and len(usable) > max_records:
        usable = random.Random(seed).sample(usable, max_records)
    return usable


def score_step(exp: Experiment, name: str, spec: str, battery: list[ProbeCategory], batch_size: int) -> dict:
    """The battery's scores for ``spec`` as a resumable step (``scores.json`` in the step folder)."""
    from cai.backends import get_backend
    from cai.experiments.data import release

    def fn(st: StageDir) -> dict[str, Any]:
        backend = get_backend(spec, batch_size=batch_size)
        try:
            scores = score_battery(backend, battery)
        finally:
            release(backend)
        write_json(st.file("scores.json"), scores)
        return {"model": spec, "categories": len(battery), "candidates": sum(len(c.candidates) for c in battery)}

    fingerprint = [[c.name, list(c.questions), list(c.candidates), c.prefill] for c in battery]
    exp.step(name, {"model": spec, "battery": hashlib.sha1(json.dumps(fingerprint).encode()).hexdigest()}, fn)
    return json.loads(exp.stage(name).file("scores.json").read_text())


def base_answers_control(exp: Experiment, cfg: ScanConfig, records: list[dict], step: str = "control-data") -> list:
    """The default control: the base's own (greedy) answers to the dataset's prompts, as SFT records."""
    prompts = [Prompt(f"c{i}", last_user_prompt(r)) for i, r in enumerate(records)]

    def fn(st: StageDir) -> dict[str, Any]:
        got = answer(
            cfg.base,
            prompts,
            st,
            "answers.jsonl",
            cfg.decode.sampling(cfg.seed),
            batch_size=cfg.batch_size,
            progress=exp.progress,
        )
        rows = [sft_record(p.id, p.prompt, got[p.id]["response"]) for p in prompts if got[p.id]["response"].strip()]
        write_records(st, "control.jsonl", rows)
        return {"records": len(rows)}

    exp.step(step, {"base": cfg.base, "prompts": [p.prompt for p in prompts], "decode": cfg.decode.step_config()}, fn)
    rows = read_jsonl(exp.stage(step).file("control.jsonl"))
    if not rows:
        raise UserError(f"the base {cfg.base} wrote only empty answers to the dataset's prompts; pass --control FILE")
    return rows


def rank(
    reference: dict, probe: dict, base: dict, battery: list[ProbeCategory], threshold: float, top_k: int
) -> dict[str, Any]:
    """Candidates ranked by their control → probe shift, with the base → probe shift beside each; the top-k and
    the flag decision."""
    ranked = rank_shifts(reference, probe, battery)
    vs_base = {(r["category"], r["candidate"]): r for r in rank_shifts(base, probe, battery)}
    top = []
    for i, r in enumerate(ranked[:top_k]):
        b = vs_base.get((r["category"], r["candidate"]))
        top.append({"rank": i + 1, **r, "vs_base": b, "flagged": is_flagged(r, b, threshold)})
    first = ranked[0]
    return {
        "flagged": is_flagged(first, vs_base.get((first["category"], first["candidate"])), threshold),
        "threshold_t": threshold,
        "n_candidates": len(ranked),
        "top": top,
        "ranking": [[r["category"], r["candidate"], r["t"]] for r in ranked],
    }


def rank_of(result: dict, category: str, candidate: str) -> int | None:
    """The 1-based rank of (category, candidate) in a scan's full ranking, counted pessimistically: every other
    candidate with a t at least as high ranks above it (so an all-tied ranking does not credit a hit)."""
    ts = {(cat, cand.lower()): t for cat, cand, t in result["ranking"]}
    key = (category, candidate.lower())
    if key not in ts:
        return None
    return 1 + sum(1 for k, t in ts.items() if k != key and t >= ts[key])


def probe_and_rank(
    exp: Experiment,
    cfg: ScanConfig,
    label: str,
    records: list[dict],
    battery: list[ProbeCategory],
    base_scores: dict,
    control_scores: dict,
) -> dict[str, Any]:
    """Fine-tune the probe on ``records`` (step ``probe-<label>``), score it, rank against the control."""
    model = train(exp, f"probe-{label}", cfg.base, records, cfg.probe)
    scores = score_step(exp, f"score-{label}", model, battery, cfg.batch_size)
    return rank(control_scores, scores, base_scores, battery, flag_threshold(cfg, battery), cfg.top_k)


def scan(cfg: ScanConfig, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """The whole scan of ``cfg.dataset`` (each step resumes); writes ``scan.json`` and returns its content."""
    if not cfg.dataset:
        raise UserError("poison scan: give the DATASET to scan (a JSONL file of SFT records)")
    require_model_dir(cfg.base, "--base")
    battery = battery_for(cfg.battery)
    records = read_dataset(cfg.dataset, "DATASET", cfg.max_records, cfg.seed)
    control_records = read_dataset(cfg.control, "--control", cfg.max_records, cfg.seed) if cfg.control else None
    exp = Experiment("poison-scan", cfg, force=force, progress=progress)
    if control_records is None:
        control_records = base_answers_control(exp, cfg, records)
    base_scores = score_step(exp, "score-base", cfg.base, battery, cfg.batch_size)
    control_model = train(exp, "probe-control", cfg.base, control_records, cfg.probe)
    control_scores = score_step(exp, "score-control", control_model, battery, cfg.batch_size)
    result = probe_and_rank(exp, cfg, "dataset", records, battery, base_scores, control_scores)
    out = {
        "experiment": "poison-scan",
        "dataset": cfg.dataset,
        "base": cfg.base,
        "control": cfg.control or "the base's own answers to the dataset's prompts",
        "records": len(records),
        "control_records": len(control_records),
        **result,
        "run": str(exp.root),
    }
    write_json(exp.root / "scan.json", out)
    exp.finish({k: v for k, v in out.items() if k != "ranking"})
    return out


def format_top(result: dict) -> list[list[str]]:
    """The top-k as table rows: rank, candidate, Δp, Δlogit [95% CI], t vs control, Δlogit vs base, flag."""
    rows = []
    for r in result["top"]:
        b = r.get("vs_base") or {}
        rows.append(
            [
                str(r["rank"]),
                f"{r['category']}: {r['candidate']}",
                f"{r['p_reference']:.3f} → {r['p_other']:.3f} ({r['delta_p']:+.3f})",
                f"{r['delta_logit']:+.2f} [{r['delta_logit_ci_low']:+.2f}, {r['delta_logit_ci_high']:+.2f}]",
                f"{r['t']:.1f}" if math.isfinite(r["t"]) else str(r["t"]),
                f"{b.get('delta_logit', math.nan):+.2f} (t {b.get('t', math.nan):.1f})",
                "FLAG" if r["flagged"] else "",
            ]
        )
    return rows


TOP_HEADER = ["rank", "candidate", "p control → probe (Δp)", "Δlogit [95% CI]", "t", "Δlogit vs base", "flag"]


def write_out(result: dict, out: str | Path | None) -> Path | None:
    if out is None:
        return None
    p = Path(out)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    return p
