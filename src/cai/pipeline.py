"""``cai run``: executes a config's stages in order. Each stage is ``run(ctx) -> dict`` in its own module (the
registry is :data:`cai.stages.STAGES`) and reads only artifacts of earlier stages from the run directory, so every
stage resumes after a kill."""

from __future__ import annotations

import importlib
from typing import Any

from cai.config import RunConfig
from cai.runs import RunDir, run_step
from cai.stages import STAGES, ModelPool, StageContext
from cai.tracking import StageTracking, require_trackers


def run_pipeline(
    config: RunConfig, *, force: bool = False, only: list[str] | None = None, progress: bool = True, on_stage=None
) -> dict[str, dict[str, Any]]:
    """Run the configured stages in order; returns each stage's summary. A complete stage whose config is
    unchanged is skipped; ``force`` recomputes the stages that run. A configured tracker whose package is missing
    fails here, before any stage runs."""
    require_trackers(config.tracking.report_to)
    run = RunDir.create(config.runs_dir, config.name)
    pool = ModelPool(config)
    summaries: dict[str, dict[str, Any]] = {}
    try:
        for name in config.stages:
            if only and name not in only:
                continue

            module = importlib.import_module(STAGES[name])

            tracking = (
                StageTracking.for_stage(config.tracking, run.root, config.name, name)
                if config.tracking.report_to
                else None
            )

            def stage_run(stage, module=module, tracking=tracking) -> dict[str, Any]:
                ctx = StageContext(
                    config=config,
                    run=run,
                    stage=stage,
                    pool=pool,
                    force=force,
                    progress=progress,
                    tracking=tracking,
                )
                return module.run(ctx)

            # a stage whose result also depends on something outside its config (eval: the judge's version)
            # names it, and re-runs in place when it changes (see run_step)
            revision = module.revision(config) if hasattr(module, "revision") else None
            step = run_step(run, name, config.section(name), stage_run, force=force, revision=revision)
            if step.reused:
                summaries[name] = {"status": "already complete", **step.stage.manifest.get("counts", {})}
            else:
                summaries[name] = step.value or {}
                summaries[name].setdefault("seconds", step.seconds)
            if on_stage:
                on_stage(name, summaries[name])
    finally:
        pool.release()
    return summaries
