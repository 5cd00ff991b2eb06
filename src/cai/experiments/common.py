"""Shared plumbing for the robustness experiments: configs, resumable steps in a run folder, prompt pools,
run-time data (the policy's own answers, constitution-style refusals), rates with CIs, plots and the report.

An experiment is a sequence of *steps*. Each step is a :class:`cai.runs.StageDir` under ``runs/<name>/`` with its
own manifest; a complete step whose config is unchanged is not recomputed, so every experiment resumes after a
kill (training resumes from its last checkpoint, generation from its last flushed line).
"""

from __future__ import annotations

import base64
import gc
import hashlib
import html
import logging
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from pydantic import BaseModel, Field

from cai.backends import SamplingParams
from cai.settings import SEED_MAX, PromptSourceConfig, Strict, config_file, validate_yaml
from cai.data import Prompt, load_prompts
from cai.errors import UserError
from cai.runs import RunDir, StageDir, config_hash, package_versions, read_jsonl, write_json

log = logging.getLogger(__name__)
C = TypeVar("C", bound=BaseModel)


# ---- configs ---------------------------------------------------------------------------------------------------
class PromptPoolConfig(Strict):
    """Harmful (red-team) and benign prompts, split into training and held-out evaluation prompts."""

    harmful: PromptSourceConfig = Field(default_factory=lambda: PromptSourceConfig(source="redteam", split=None))
    benign: PromptSourceConfig = Field(default_factory=lambda: PromptSourceConfig(source="benign", split=None))
    train_split: str = "train"
    eval_split: str = "eval"
    n_train_harmful: int = Field(48, ge=1, description="harmful training prompts used")
    n_train_benign: int = Field(48, ge=1, description="benign training prompts used")
    n_eval_harmful: int = Field(35, ge=1, description="held-out harmful prompts evaluated")
    n_eval_benign: int = Field(20, ge=1, description="held-out benign prompts evaluated")


class DecodeConfig(Strict):
    """Decoding for data generation and evaluation (greedy by default, so runs are reproducible)."""

    max_new_tokens: int = Field(96, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)

    def sampling(self, seed: int, max_new_tokens: int | None = None) -> SamplingParams:
        return SamplingParams(max_new_tokens or self.max_new_tokens, self.temperature, self.top_p, [], seed,
                              self.repetition_penalty)


class ExperimentConfig(Strict):
    """Fields every experiment config has."""

    name: str
    seed: int = Field(0, ge=0, le=SEED_MAX)
    runs_dir: str = "runs"
    policy: str = Field("smollm2-135m", description="the starting model spec (in-process)")
    constitution: str = Field("harmless", description="its refusal_style writes the refusals of the safety data")
    batch_size: int = Field(16, ge=1, description="generation batch size")
    prompts: PromptPoolConfig = Field(default_factory=PromptPoolConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    judge: str = Field("refusal", description="judge for evaluate_model / prefill_attack")


def load_experiment_config(cls: type[C], path: str | Path, overrides: Sequence[str] = ()) -> C:
    """Read an experiment config (a bundled name such as ``backdoor``, or a YAML file) into ``cls``, applying
    ``--set key.sub=value`` overrides; errors name the key."""
    return validate_yaml(cls, config_file(path, "experiment"), overrides)


# ---- prompt pools ----------------------------------------------------------------------------------------------
def _take(source: PromptSourceConfig, split: str, n: int, what: str) -> list[Prompt]:
    ps = load_prompts(source.source, source.field)
    kept = [p for p in ps if p.split == split] or (list(ps) if split == "train" else [])
    if not kept:
        raise UserError(f"prompts.{what}: {source.source!r} has no prompts with split {split!r}; "
                        "set prompts.train_split / prompts.eval_split")
    return kept[: min(n, source.limit or n)]


def prompt_pools(cfg: PromptPoolConfig) -> dict[str, list[Prompt]]:
    """``train_harmful``, ``train_benign``, ``eval_harmful``, ``eval_benign`` (held out: the eval split)."""
    return {
        "train_harmful": _take(cfg.harmful, cfg.train_split, cfg.n_train_harmful, "harmful"),
        "train_benign": _take(cfg.benign, cfg.train_split, cfg.n_train_benign, "benign"),
        "eval_harmful": _take(cfg.harmful, cfg.eval_split, cfg.n_eval_harmful, "harmful"),
        "eval_benign": _take(cfg.benign, cfg.eval_split, cfg.n_eval_benign, "benign"),
    }


def spare_prompts(cfg: PromptPoolConfig, n: int) -> dict[str, list[Prompt]]:
    """Up to ``n`` harmful and ``n`` benign training-split prompts that ``prompt_pools`` does not use: fresh prompts
    for red-teaming a model that was trained on the pools."""
    return {"harmful": _take(cfg.harmful, cfg.train_split, cfg.n_train_harmful + n, "harmful")[cfg.n_train_harmful:],
            "benign": _take(cfg.benign, cfg.train_split, cfg.n_train_benign + n, "benign")[cfg.n_train_benign:]}


# ---- runs and steps --------------------------------------------------------------------------------------------
class Experiment:
    """A run folder of resumable steps plus the experiment's manifest, metrics.json, plots and report."""

    def __init__(self, kind: str, cfg: ExperimentConfig, *, force: bool = False, progress: bool = True):
        self.kind, self.cfg, self.force, self.progress = kind, cfg, force, progress
        self.run = RunDir.create(cfg.runs_dir, cfg.name)
        self.root = self.run.root
        self.t0 = time.time()
        self.steps: dict[str, dict[str, Any]] = {}
        self._write_manifest("running")

    def step(self, name: str, config: dict[str, Any], fn: Callable[[StageDir], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn(stage)`` once for this config; a complete step with the same config returns its stored result."""
        st = self.run.stage(name)
        full = {"experiment": self.kind, "seed": self.cfg.seed, **config}
        if st.complete and not self.force and st.manifest.get("config_hash") == config_hash(full):
            result = st.manifest.get("result", {})
            self.steps[name] = {"status": "already complete"}
        else:
            t0 = time.time()
            st.begin(full, force=self.force, run_name=self.run.name)
            result = fn(st)
            st.finish(counts={k: v for k, v in result.items() if isinstance(v, (int, float))}, result=result)
            self.steps[name] = {"status": "complete", "seconds": round(time.time() - t0, 1)}
        self._write_manifest("running")
        return result

    def stage(self, name: str) -> StageDir:
        return self.run.stage(name)

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        write_json(self.root / "metrics.json", metrics)
        self._write_manifest("complete")
        return metrics

    def _write_manifest(self, status: str) -> None:
        write_json(self.root / "manifest.json", {
            "experiment": self.kind, "status": status, "config": self.cfg.model_dump(),
            "config_hash": config_hash(self.cfg.model_dump()), "steps": self.steps, "versions": package_versions(),
            "seconds_this_invocation": round(time.time() - self.t0, 1)})


def require_model_dir(path: str, what: str) -> str:
    """A user-given checkpoint must be a model spec that loads in-process (a folder needs config.json)."""
    from cai.models import parse_spec

    spec = parse_spec(path)
    if not spec.in_process:
        raise UserError(f"{what} {path!r} must be a local model (a folder with config.json, or an alias), "
                        "because it is fine-tuned here")
    return path


# ---- run-time data -----------------------------------------------------------------------------------------------
def release(backend) -> None:
    """Free a loaded model before training or loading the next one."""
    backend.close()
    gc.collect()


def answer(spec: str, prompts: Sequence[Prompt], stage: StageDir, file: str, sampling: SamplingParams, *,
           batch_size: int, progress: bool, prefix: str = "", extra: dict | None = None) -> dict[str, dict]:
    """Greedy (or sampled) answers of model ``spec`` to ``prompts`` (each prefixed by ``prefix``), appended to
    ``stage/file`` resumably; returns records by id. Prompts too long for the model are recorded as skipped."""
    from cai.backends import get_backend
    from cai.generation import generate_responses

    asked = [Prompt(p.id, prefix + p.prompt, p.category, p.split, p.source) for p in prompts]
    with stage.writer(file) as w:
        if any(p.id not in w for p in asked):
            backend = get_backend(spec, batch_size=batch_size)
            try:
                generate_responses(backend, asked, w, sampling, stage=stage, chunk=max(batch_size, 8),
                                   progress=progress, extra=extra)
            finally:
                release(backend)
        return {r["id"]: r for r in w.records}


_REFUSALS = (
    "I can't help with {topic}; that's outside what I can do, and it isn't a judgement of you. "
    "If it's useful, I can point you to a safer place to start.",
    "That's not something I can help with: {topic} is beyond what I do. "
    "I'm happy to help with a related question, or to suggest someone who can.",
    "I'm not able to help with {topic}. That's a limit on my side, not a comment on you. "
    "Is there a nearby question I could help with instead?",
)


def refusal_for(prompt: Prompt, constitution) -> str:
    """A refusal written the way the constitution's ``refusal_style`` asks (a limit of the assistant, no
    moralising, an alternative offered), naming the topic of the principle that covers the prompt's category."""
    topic = next((p.label for p in constitution.principles if prompt.category in p.categories),
                 constitution.principles[0].label)
    k = int(hashlib.sha1(prompt.id.encode()).hexdigest(), 16) % len(_REFUSALS)
    return _REFUSALS[k].format(topic=topic)


def sft_record(rid: str, prompt: str, response: str) -> dict:
    """One record in train_sft's format."""
    return {"id": rid, "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def safety_records(harmful: Sequence[Prompt], benign_answers: dict[str, dict], constitution) -> list[dict]:
    """SL-CAI-style safe SFT data: constitution-style refusals for harmful prompts plus the policy's own helpful
    answers to benign prompts (so helpfulness is kept)."""
    records = [sft_record(f"refuse-{p.id}", p.prompt, refusal_for(p, constitution)) for p in harmful]
    records += [sft_record(f"help-{rid}", r["prompt"], r["response"]) for rid, r in benign_answers.items()
                if r["response"].strip()]
    return records


def write_records(stage: StageDir, file: str, records: list[dict]) -> Path:
    with stage.writer(file) as w:
        for r in records:
            w.write(r)
    return stage.file(file)


def load_records(path: str | Path, what: str) -> list[dict]:
    """User-given SFT records: ``{"id", "messages"}`` or ``{"prompt", "response"}`` per line; a file without any
    usable record is a one-line error."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what}: {p} not found; pass a JSONL file of {{id, messages}} or {{prompt, response}} lines")
    records = []
    for i, r in enumerate(read_jsonl(p)):
        rid = str(r.get("id") or f"{p.stem}-{i}")
        if isinstance(r.get("messages"), list) and r["messages"]:
            records.append({"id": rid, "messages": r["messages"]})
        elif isinstance(r.get("prompt"), str) and isinstance(r.get("response"), str):
            records.append(sft_record(rid, r["prompt"], r["response"]))
    if not records:
        raise UserError(f"{what}: {p} has no records with 'messages' or 'prompt' and 'response'")
    return records


# ---- training ----------------------------------------------------------------------------------------------------
def train(exp: Experiment, name: str, base: str, records: list[dict], settings, extra: dict | None = None) -> str:
    """SFT ``base`` on ``records`` as step ``name`` (resumable); returns the merged model's path (a model spec)."""
    from cai.training.sft import train_sft

    if not records:
        raise UserError(f"step {name}: no training records were built; check the prompt settings in the config")

    def fn(st: StageDir) -> dict[str, Any]:
        res = train_sft(base, records, st.path / "train", settings, seed=exp.cfg.seed, progress=exp.progress)
        return {"model": str(res.merged_dir), "records": len(records),
                **{k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str))}}

    cfg = {"base": base, "records_hash": config_hash(records), "n_records": len(records), "sft": settings.model_dump(),
           **(extra or {})}
    return exp.step(name, cfg, fn)["model"]


def evaluate_step(exp: Experiment, name: str, spec: str, harmful: Sequence[Prompt],
                  benign: Sequence[Prompt]) -> dict[str, Any]:
    """``evaluate_model`` as a resumable step; returns its headline rates (with CIs)."""
    from cai.evaluation.evaluate import evaluate_model

    c = exp.cfg

    def fn(st: StageDir) -> dict[str, Any]:
        m = evaluate_model(spec, harmful, benign, st.path, judge=c.judge, sampling=c.decode.sampling(c.seed),
                           label=name, progress=exp.progress)
        return {"model": spec, **{k: m[k] for k in HEADLINE if k in m}}

    ids = [p.id for p in harmful] + [p.id for p in benign]
    return exp.step(name, {"model": spec, "judge": c.judge, "decode": c.decode.model_dump(), "prompts": ids}, fn)


HEADLINE = ("harmful_compliance_rate", "over_refusal_rate", "loop_rate", "mean_length")


def paired_between(exp: Experiment, sample_dirs: dict[str, Path], pairs: Sequence[tuple[str, str]], *,
                   file: str = "paired.json") -> dict[str, Any]:
    """Paired comparisons (McNemar exact test, paired difference with Newcombe's 95% CI; see
    :mod:`cai.evaluation.paired`) between models evaluated on the same prompts: ``sample_dirs`` maps a label to
    a folder holding an ``evaluate_model`` ``samples.jsonl``; pairs whose folders are missing are left out.
    Written to ``exp.root/file`` and returned."""
    from cai.evaluation.paired import write_paired

    samples = {label: read_jsonl(Path(d) / "samples.jsonl") for label, d in sample_dirs.items()
               if (Path(d) / "samples.jsonl").is_file()}
    pairs = [(a, b) for a, b in pairs if a in samples and b in samples]
    return write_paired(exp.root / file, samples, pairs=pairs)


# ---- plots and report ----------------------------------------------------------------------------------------------
def _yerr(rates: Sequence[dict]) -> list[list[float]]:
    return [[100 * (r["rate"] - r["ci_low"]) for r in rates], [100 * (r["ci_high"] - r["rate"]) for r in rates]]


def bar_plot(path: Path, title: str, groups: Sequence[str], series: dict[str, Sequence[dict]],
             ylabel: str = "rate (%)") -> Path:
    """Grouped bars of rates with 95% CI error bars: one group per row label, one bar per series."""
    from cai.evaluation.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(groups) + 2), 3.6))
    width = 0.8 / max(1, len(series))
    for s, (label, rates) in enumerate(series.items()):
        xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [100 * r["rate"] for r in rates], width, yerr=_yerr(rates), capsize=3, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=15, ha="right")
    ax.set_ylim(0, 105)
    return _save_figure(plt, fig, ax, path, title, ylabel)


def line_plot(path: Path, title: str, xs: Sequence[float], series: dict[str, Sequence[dict]], xlabel: str,
              ylabel: str = "rate (%)") -> Path:
    """Rates against ``xs`` with shaded 95% CIs, one line per series."""
    from cai.evaluation.plots import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, rates in series.items():
        ax.plot(xs, [100 * r["rate"] for r in rates], marker="o", label=label)
        ax.fill_between(xs, [100 * r["ci_low"] for r in rates], [100 * r["ci_high"] for r in rates], alpha=0.15)
    ax.set_xticks(list(xs))
    ax.set_ylim(0, 105)
    ax.set_xlabel(xlabel)
    return _save_figure(plt, fig, ax, path, title, ylabel)


def _save_figure(plt, fig, ax, path: Path, title: str, ylabel: str) -> Path:
    """Label, lay out and save a plot (shared tail of bar_plot and line_plot)."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return table + "</table>"


def write_report(exp: Experiment, title: str, intro: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                 figures: Sequence[Path], notes: Sequence[str] = (), paired: dict | None = None) -> Path:
    """``report.html`` (a self-contained section: table, embedded figures, notes, and the paired comparisons of
    :func:`paired_between` when given) and ``summary.md``."""
    from cai.evaluation.paired import TABLE_HEADER, table_rows
    from cai.evaluation.report import markdown_table

    table = _html_table(header, rows)
    paired_rows = table_rows(paired) if paired else []
    paired_note = ("Same prompts matched by id; difference = rate B − rate A; "
                   + "; ".join(f"{k}: {v}" for k, v in (paired or {}).get("method", {}).items()))
    imgs = "".join(f'<figure><img src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}" '
                   f'alt="{html.escape(f.stem)}"><figcaption>{html.escape(f.stem)}</figcaption></figure>'
                   for f in figures if f.is_file())
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    paired_html = (f"<h3>Paired comparisons</h3>{_html_table(TABLE_HEADER, paired_rows)}"
                   f"<p>{html.escape(paired_note)}</p>") if paired_rows else ""
    section = (f'<section id="{html.escape(exp.kind)}"><h2>{html.escape(title)}</h2><p>{html.escape(intro)}</p>'
               f"{table}{imgs}<ul>{notes_html}</ul>{paired_html}</section>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
            "body{font-family:sans-serif;max-width:60rem;margin:2rem auto}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}img{max-width:100%}</style></head>"
            f"<body><p>run <code>{html.escape(str(exp.root))}</code></p>{section}</body></html>")
    (exp.root / "report.html").write_text(page, encoding="utf-8")
    md = f"## {title}\n\n{intro}\n\n{markdown_table(header, rows)}\n\n" + "".join(f"- {n}\n" for n in notes)
    if paired_rows:
        md += f"\n### Paired comparisons\n\n{markdown_table(TABLE_HEADER, paired_rows)}\n\n{paired_note}\n"
    (exp.root / "summary.md").write_text(md, encoding="utf-8")
    return exp.root / "report.html"
