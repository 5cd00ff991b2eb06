"""``cai run``: executes a config's stages in order. Each stage is ``run(ctx) -> dict`` in its own module and
reads only artifacts of earlier stages from the run directory, so every stage resumes after a kill."""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from cai.config import RunConfig
from cai.runs import RunDir, StageDir

log = logging.getLogger(__name__)

# stage name -> module under cai.stages that defines run(ctx). Order is the pipeline's data flow.
STAGES: dict[str, str] = {
    "prompts": "cai.stages.prompts",
    "generate": "cai.stages.generate",
    "classify": "cai.stages.classify",
    "critique": "cai.stages.critique",
    "sft": "cai.stages.sft",
    "preferences": "cai.stages.preferences",
    "reward": "cai.stages.reward",
    "rl": "cai.stages.rl",
    "dpo": "cai.stages.dpo",
    "eval": "cai.stages.eval",
    "report": "cai.stages.report",
}


def final_model_spec(run: RunDir, config: RunConfig) -> str:
    """The newest trained policy: rl/ or dpo/ (whichever finished last), else the SL model, else the policy."""
    done = [(run.stage(s).manifest.get("finished_at", ""), s) for s in ("rl", "dpo")
            if run.stage(s).complete and (run.root / s / "model" / "config.json").is_file()]
    if done:
        return str(run.root / max(done)[1] / "model")
    from cai.stages.sft import sl_model_spec

    return sl_model_spec(run, config)


class ModelPool:
    """Backends by spec, created on first use and shared between roles (policy == feedback loads once)."""

    def __init__(self, config: RunConfig):
        self.config = config
        self._backends: dict[str, Any] = {}

    def get(self, spec: str):
        if spec not in self._backends:
            from cai.backends import get_backend

            m = self.config.models
            t0 = time.time()
            self._backends[spec] = get_backend(spec, batch_size=m.batch_size, dtype=m.dtype, concurrency=m.concurrency)
            log.info("loaded %s in %.1fs", spec, time.time() - t0)
        return self._backends[spec]

    def policy(self):
        return self.get(self.config.models.policy)

    def feedback(self):
        return self.get(self.config.models.feedback_spec)

    def release(self) -> None:
        """Free loaded models (before a training stage needs the memory)."""
        for b in self._backends.values():
            b.close()
        self._backends.clear()


@dataclass
class StageContext:
    """What a stage gets: the config, the run folder, its own stage folder, shared models, flags."""

    config: RunConfig
    run: RunDir
    stage: StageDir
    pool: ModelPool
    force: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def run_stage(name: str, ctx_base: dict[str, Any]) -> dict[str, Any]:
    module = importlib.import_module(STAGES[name])
    config: RunConfig = ctx_base["config"]
    run: RunDir = ctx_base["run"]
    stage = run.stage(name)
    stage.begin(config.section(name), force=ctx_base.get("force", False), run_name=run.name)
    ctx = StageContext(stage=stage, **ctx_base)
    summary = module.run(ctx) or {}
    return summary


def run_pipeline(config: RunConfig, *, force: bool = False, only: list[str] | None = None,
                 progress: bool = True, on_stage=None) -> dict[str, dict[str, Any]]:
    """Run the configured stages in order; returns each stage's summary. A complete stage whose config is
    unchanged is skipped; ``force`` recomputes the stages that run."""
    run = RunDir.create(config.runs_dir, config.name)
    pool = ModelPool(config)
    summaries: dict[str, dict[str, Any]] = {}
    try:
        for name in config.stages:
            if only and name not in only:
                continue
            st = run.stage(name)
            from cai.runs import config_hash

            if st.complete and not force and st.manifest.get("config_hash") == config_hash(config.section(name)):
                summaries[name] = {"status": "already complete", **st.manifest.get("counts", {})}
                if on_stage:
                    on_stage(name, summaries[name])
                continue
            t0 = time.time()
            summaries[name] = run_stage(name, dict(config=config, run=run, pool=pool, force=force, progress=progress))
            summaries[name].setdefault("seconds", round(time.time() - t0, 1))
            if on_stage:
                on_stage(name, summaries[name])
    finally:
        pool.release()
    return summaries
