"""An experiment's run folder and its resumable steps: the generic step, and the training, evaluation and paired
comparison steps every experiment uses.

An experiment is a sequence of *steps*. Each step is a :class:`cai.runs.StageDir` under ``runs/<name>/`` with its
own manifest, run through :func:`cai.runs.run_step` (the pipeline's primitive too): a complete step whose config
is unchanged is not recomputed, so every experiment resumes after a kill (training resumes from its last
checkpoint, generation from its last flushed line).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cai.data import Prompt
from cai.errors import UserError
from cai.experiments.config import ExperimentConfig
from cai.runs import RunDir, StageDir, config_hash, package_versions, read_jsonl, run_step, write_json

HEADLINE = ("harmful_compliance_rate", "over_refusal_rate", "loop_rate", "mean_length")


class Experiment:
    """A run folder of resumable steps plus the experiment's manifest and metrics.json."""

    def __init__(self, kind: str, cfg: ExperimentConfig, *, force: bool = False, progress: bool = True):
        self.kind, self.cfg, self.force, self.progress = kind, cfg, force, progress
        self.run = RunDir.create(cfg.runs_dir, cfg.name)
        self.root = self.run.root
        self.t0 = time.time()
        self.steps: dict[str, dict[str, Any]] = {}
        self._write_manifest("running")

    def step(
        self,
        name: str,
        config: dict[str, Any],
        fn: Callable[[StageDir], dict[str, Any]],
        *,
        revision: str | None = None,
    ) -> dict[str, Any]:
        """Run ``fn(stage)`` once for this config; a complete step with the same config (and ``revision``, see
        :func:`cai.runs.run_step`) returns its stored result."""

        def body(st: StageDir) -> dict[str, Any]:
            result = fn(st)
            st.finish(counts={k: v for k, v in result.items() if isinstance(v, (int, float))}, result=result)
            return result

        done = run_step(
            self.run,
            name,
            {"experiment": self.kind, "seed": self.cfg.seed, **config},
            body,
            force=self.force,
            revision=revision,
        )
        if done.reused:
            result = done.stage.manifest.get("result", {})
            self.steps[name] = {"status": "already complete"}
        else:
            result = done.value
            self.steps[name] = {"status": "complete", "seconds": done.seconds}
        self._write_manifest("running")
        return result

    def stage(self, name: str) -> StageDir:
        return self.run.stage(name)

    def records(self, step: str, file: str) -> list[dict]:
        """The JSONL records a finished step wrote to ``file``."""
        from cai.runs import read_jsonl

        return read_jsonl(self.stage(step).file(file))

    def finish(self, metrics: dict[str, Any]) -> dict[str, Any]:
        write_json(self.root / "metrics.json", metrics)
        self._write_manifest("complete")
        return metrics

    def _write_manifest(self, status: str) -> None:
        write_json(
            self.root / "manifest.json",
            {
                "experiment": self.kind,
                "status": status,
                "config": self.cfg.model_dump(),
                "config_hash": config_hash(self.cfg.model_dump()),
                "steps": self.steps,
                "versions": package_versions(),
                "seconds_this_invocation": round(time.time() - self.t0, 1),
            },
        )


def require_model_dir(path: str, what: str) -> str:
    """A user-given checkpoint must be a model spec that loads in-process (a folder needs config.json)."""
    from cai.models import parse_spec

    spec = parse_spec(path)
    if not spec.in_process:
        raise UserError(
            f"{what} {path!r} must be a local model (a folder with config.json, or an alias), "
            "because it is fine-tuned here"
        )
    return path


def train(
    exp: Experiment,
    name: str,
    base: str,
    records: list[dict],
    settings,
    extra: dict | None = None,
    *,
    seed: int | None = None,
) -> str:
    """SFT ``base`` on ``records`` as step ``name`` (resumable); returns the merged model's path (a model spec).
    ``seed`` (data order, LoRA init) defaults to the experiment's seed; experiments that train several seeds of
    one model pass it."""
    from cai.training.sft import train_sft

    if not records:
        raise UserError(f"step {name}: no training records were built; check the prompt settings in the config")
    train_seed = exp.cfg.seed if seed is None else seed

    def fn(st: StageDir) -> dict[str, Any]:
        res = train_sft(base, records, st.path / "train", settings, seed=train_seed, progress=exp.progress)
        return {
            "model": str(res.merged_dir),
            "records": len(records),
            **{k: v for k, v in res.metrics.items() if isinstance(v, (int, float, str))},
        }

    cfg = {
        "base": base,
        "records_hash": config_hash(records),
        "n_records": len(records),
        "sft": settings.model_dump(),
        **({"train_seed": seed} if seed is not None else {}),  # absent by default: older runs' steps still match
        **(extra or {}),
    }
    return exp.step(name, cfg, fn)["model"]


def evaluate_step(
    exp: Experiment, name: str, spec: str, harmful: Sequence[Prompt], benign: Sequence[Prompt]
) -> dict[str, Any]:
    """``evaluate_model`` as a resumable step; returns its headline rates (with CIs)."""
    from cai.evaluation.evaluate import evaluate_model
    from cai.evaluation.judges import judge_revision

    c = exp.cfg

    def fn(st: StageDir) -> dict[str, Any]:
        m = evaluate_model(
            spec,
            harmful,
            benign,
            st.path,
            judge=c.judge,
            sampling=c.decode.sampling(c.seed),
            label=name,
            progress=exp.progress,
        )
        return {"model": spec, **{k: m[k] for k in HEADLINE if k in m}}

    ids = [p.id for p in harmful] + [p.id for p in benign]
    return exp.step(
        name,
        {"model": spec, "judge": c.judge, "decode": c.decode.step_config(), "prompts": ids},
        fn,
        revision=judge_revision(c.judge),
    )


def paired_between(
    exp: Experiment, sample_dirs: dict[str, Path], pairs: Sequence[tuple[str, str]], *, file: str = "paired.json"
) -> dict[str, Any]:
    """Paired comparisons (McNemar exact test, paired difference with Newcombe's 95% CI; see
    :mod:`cai.evaluation.paired`) between models evaluated on the same prompts: ``sample_dirs`` maps a label to
    a folder holding an ``evaluate_model`` ``samples.jsonl``; pairs whose folders are missing are left out.
    Written to ``exp.root/file`` and returned."""
    from cai.evaluation.paired import write_paired

    samples = {
        label: read_jsonl(Path(d) / "samples.jsonl")
        for label, d in sample_dirs.items()
        if (Path(d) / "samples.jsonl").is_file()
    }
    pairs = [(a, b) for a, b in pairs if a in samples and b in samples]
    return write_paired(exp.root / file, samples, pairs=pairs)
