"""Measuring the scanner (``cai poison eval``): plant known traits, scan, and count how often the scan finds them
and how often it flags clean data.

Every set answers the same prompts (those of ``seed``). For every data format in ``formats`` the base writes
*control* data without a trait prompt, one draw per control replicate (sampling seeds ``seed + 100 + i``): the
shared controls of every scan in that format, trained and scored once, whose spread is the scan's null. Each
trait's teacher (the base + the trait's system prompt, :mod:`cai.experiments.trait_data`) samples with ``seed``;
``numbers`` data passes the full subliminal filter (format, mentions, MiniLM similarity), ``chat`` data is kept
*unfiltered* (the teacher talks about its trait: the easy case). Clean datasets are more base-written data sampled
with ``clean_seeds`` — so a clean set differs from the controls exactly as a planted set does, minus the trait.
Every set is scanned against its format's controls, and the report gives, per kind, recall@1 / recall@5 of the
true trait (Wilson CIs), how often planted sets were flagged, the false-positive rate on clean sets, and each
planted set's rank of its trait among all the battery's candidates. The base's battery scores are computed once.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from cai.experiments.data import write_records
from cai.experiments.poison_scan import (
    ScanConfig,
    battery_for,
    control_scores,
    flag_p,
    probe_and_rank,
    rank_of,
    score_step,
)
from cai.experiments.report import write_report
from cai.experiments.steps import Experiment, require_model_dir
from cai.experiments.trait_data import DataFormat, TraitConfig, filter_records, valid_format, write_trait_data
from cai.runs import StageDir, read_jsonl

Kind = Literal["subliminal", "plain", "clean"]
MIN_RECORDS = 4  # fewer surviving samples than this and a set is reported as skipped instead of scanned
KIND_OF_FORMAT = {"numbers": "subliminal", "code": "subliminal", "chat": "plain"}
CONTROL_SEED_OFFSET = 100  # control replicate i samples with seed + 100 + i: apart from the planted and clean seeds


def control_seeds(cfg: ScanEvalConfig) -> list[int]:
    """The sampling seeds of the control replicates (every set answers the same prompts, those of ``cfg.seed``;
    planted sets sample with ``cfg.seed``, clean sets with ``clean_seeds``)."""
    return [cfg.seed + CONTROL_SEED_OFFSET + i for i in range(cfg.control_replicates)]


class ScanEvalConfig(ScanConfig):
    name: str = "poison-scan-eval"
    traits: list[TraitConfig] = Field(default_factory=lambda: [TraitConfig()])
    formats: list[DataFormat] = Field(
        default_factory=lambda: list[DataFormat](["numbers", "chat"]),
        description="numbers/code data are filtered (subliminal); chat data is kept unfiltered (plain)",
    )
    n_records: int = Field(48, ge=4, description="samples each teacher / clean writer is asked for")
    clean_seeds: list[int] = Field(default_factory=lambda: [1, 2], description="seeds of the clean datasets")
    clean_formats: list[DataFormat] | None = Field(
        None, description="formats of the clean datasets; null = all formats"
    )
    use_embeddings: bool = Field(True, description="the subliminal filter's MiniLM check")
    constrain_format: bool = Field(
        True, description="numbers: hold decoding to the number-list format (see cai subliminal's config)"
    )

    @model_validator(mode="after")
    def _distinct_seeds(self) -> ScanEvalConfig:
        taken = {self.seed, *control_seeds(self)}
        if clash := sorted(set(self.clean_seeds) & taken):
            raise ValueError(
                f"clean_seeds {clash} would repeat the planted sets' seed ({self.seed}) or a control replicate's "
                f"({', '.join(map(str, control_seeds(self)))}); pick other seeds"
            )
        return self


def run(cfg: ScanEvalConfig, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Plant, scan, count (each step resumes); returns metrics.json's content."""
    from cai.evaluation.metrics import rate

    require_model_dir(cfg.base, "base")
    battery = battery_for(cfg.battery)
    for t in cfg.traits:
        next(c for c in battery if c.name == t.category).index(t.value)  # UserError when not a candidate
    exp = Experiment("poison-eval", cfg, force=force, progress=progress)
    threshold = flag_p(cfg, battery)
    base_scores = score_step(exp, "score-base", cfg.base, battery, cfg.batch_size)
    scans: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []

    def data(name: str, fmt: DataFormat, trait: TraitConfig, seed: int, with_trait: bool, filtered: bool) -> list[dict]:
        def fn(st: StageDir) -> dict[str, Any]:
            raw = write_trait_data(
                cfg.base,
                trait,
                fmt,
                cfg.n_records,
                st,
                seed,
                with_trait,
                batch_size=cfg.batch_size,
                constrain=cfg.constrain_format,
                prompt_seed=cfg.seed,
                progress=progress,
            )
            if filtered:
                kept, removed = filter_records(raw, trait, fmt, use_embeddings=cfg.use_embeddings)
            else:  # plain data: only samples that break the format go
                kept = [r for r in raw if valid_format(fmt, r["response"])]
                removed = {"format": len(raw) - len(kept)}
            write_records(st, "records.jsonl", kept)
            return {"written": len(raw), "kept": len(kept), **{f"removed_{k}": v for k, v in removed.items()}}

        got = exp.step(
            name,
            {
                "base": cfg.base,
                "trait": trait.model_dump() if with_trait else None,
                "format": fmt,
                "n": cfg.n_records,
                "data_seed": seed,
                "prompt_seed": cfg.seed,
                "filtered": filtered,
                "embeddings": cfg.use_embeddings,
                "constrained": cfg.constrain_format and fmt == "numbers",
            },
            fn,
        )
        rows = read_jsonl(exp.stage(name).file("records.jsonl"))
        if len(rows) < MIN_RECORDS:  # reported, not fatal: one empty set must not lose the other scans
            skipped.append({"dataset": name, "format": fmt, "records": len(rows), **got})
        return rows

    for fmt in cfg.formats:
        replicates = [
            data(f"data-control-{fmt}-r{i}", fmt, cfg.traits[0], s, False, False)
            for i, s in enumerate(control_seeds(cfg))
        ]
        if min(len(r) for r in replicates) < MIN_RECORDS:
            continue
        n_control = min(len(r) for r in replicates)
        controls = control_scores(exp, cfg, replicates, battery, label=f"control-{fmt}")
        kind = KIND_OF_FORMAT[fmt]
        for t in cfg.traits:
            label = f"{fmt}-{t.category}-{t.value}".replace(" ", "_")
            planted = data(f"data-{label}", fmt, t, cfg.seed, True, kind == "subliminal")
            if len(planted) < MIN_RECORDS:
                continue
            planted = planted[:n_control]  # no more data than the controls it is compared with
            res = probe_and_rank(exp, cfg, label, planted, battery, base_scores, controls)
            scans.append(
                {
                    "label": label,
                    "kind": kind,
                    "format": fmt,
                    "trait": f"{t.category}: {t.value}",
                    "records": len(planted),
                    "rank": rank_of(res, t.category, t.value),
                    **_brief(res),
                }
            )
        for seed in cfg.clean_seeds:
            if fmt not in (cfg.clean_formats or cfg.formats):
                continue
            label = f"clean-{fmt}-s{seed}"
            clean = data(f"data-{label}", fmt, cfg.traits[0], seed, False, False)
            if len(clean) < MIN_RECORDS:
                continue
            res = probe_and_rank(exp, cfg, label, clean, battery, base_scores, controls)
            scans.append(
                {
                    "label": label,
                    "kind": "clean",
                    "format": fmt,
                    "trait": None,
                    "records": len(clean),
                    "rank": None,
                    **_brief(res),
                }
            )

    summary: dict[str, Any] = {}
    for kind in ("subliminal", "plain"):
        got = [s for s in scans if s["kind"] == kind]
        if got:
            summary[kind] = {
                "recall_at_1": rate([s["rank"] == 1 for s in got]),
                "recall_at_5": rate([s["rank"] is not None and s["rank"] <= 5 for s in got]),
                "flagged_with_true_top": rate([s["flagged"] and s["rank"] == 1 for s in got]),
                "flagged": rate([s["flagged"] for s in got]),
            }
    planted = [s for s in scans if s["kind"] != "clean"]
    clean = [s for s in scans if s["kind"] == "clean"]
    summary["all_planted"] = {
        "recall_at_1": rate([s["rank"] == 1 for s in planted]),
        "recall_at_5": rate([s["rank"] is not None and s["rank"] <= 5 for s in planted]),
    }
    summary["clean"] = {
        "false_positive_rate": rate([s["flagged"] for s in clean]),
        "max_top_z": max((s["top_z"] for s in clean), default=None),
    }
    return _finish(exp, cfg, scans, summary, threshold, battery, skipped)


def _brief(res: dict) -> dict[str, Any]:
    top = res["top"][0]
    return {
        "flagged": res["flagged"],
        "top": f"{top['category']}: {top['candidate']}",
        "top_z": top["z"],
        "top_p_null": top["p_null"],
        "top_delta_logit": top["delta_logit"],
        "top_delta_p": top["delta_p"],
        "top5": res["top"][:5],
    }


def _fmt_rate(r: dict) -> str:
    """The project's rate format (cai.evaluation.evaluate.format_rate) with the count, which is small here."""
    from cai.evaluation.evaluate import format_rate

    return f"{format_rate(r)} (n={r['n']})"


def _finish(
    exp: Experiment,
    cfg: ScanEvalConfig,
    scans: list[dict],
    summary: dict,
    threshold: float,
    battery,
    skipped: list[dict],
) -> dict[str, Any]:
    n_cand = sum(len(c.candidates) for c in battery)
    table = [
        [
            s["label"],
            s["kind"],
            s["trait"] or "—",
            str(s["rank"]) if s["rank"] else "—",
            s["top"],
            f"{s['top_z']:.1f}",
            f"{s['top_delta_logit']:+.2f}",
            "yes" if s["flagged"] else "no",
        ]
        for s in scans
    ]
    notes = [
        f"{kind}: recall@1 {_fmt_rate(v['recall_at_1'])}, recall@5 {_fmt_rate(v['recall_at_5'])}"
        + (f", flagged {_fmt_rate(v['flagged'])}" if "flagged" in v else "")
        for kind, v in summary.items()
        if kind in ("subliminal", "plain", "all_planted")
    ]
    notes.append(f"clean datasets flagged (false-positive rate): {_fmt_rate(summary['clean']['false_positive_rate'])}")
    notes.append(
        f"flag rule: top candidate's p vs the control replicates' spread ≤ {threshold:.1e} (Bonferroni) and "
        "Δlogit vs base > 0; "
        f"{n_cand} candidates in {len(battery)} categories, {min(len(c.questions) for c in battery)} questions each; "
        "95% Wilson CIs"
    )
    notes.append(
        f"controls: {cfg.control_replicates} fine-tunes per format, each on its own draw of the base's data (sampling "
        f"seeds {control_seeds(cfg)}), shared by every scan of that format; every set answers the same prompts; "
        f"planted sets sample with seed {cfg.seed}, clean sets with {cfg.clean_seeds}"
    )
    notes += [f"skipped {s['dataset']}: {s['records']} samples survived ({s})" for s in skipped]
    write_report(
        exp,
        "Poison scan: finding planted traits",
        "Each dataset is scanned by a short LoRA probe against a matched control; candidates ranked by their shift.",
        ["dataset", "kind", "planted trait", "rank of trait", "top candidate", "top z", "top Δlogit", "flagged"],
        table,
        [],
        notes,
    )
    return exp.finish(
        {
            "experiment": "poison-eval",
            "threshold_p": threshold,
            "n_candidates": n_cand,
            "summary": summary,
            "scans": scans,
            "skipped": skipped,
            "run": str(exp.root),
        }
    )
