"""The pipeline's stages: each module under ``cai.stages`` defines ``run(ctx: StageContext) -> dict`` (its
one-screen summary) and, when it has settings, its config section class (assembled by ``cai.config``).

A stage is a thin adapter: it reads earlier stages' artifacts through :mod:`cai.stages.artifacts`, calls the
library (generation, labeling, critique, classify, training, evaluation) and writes its own artifacts. It never
imports the orchestrator (``cai.pipeline``) or a sibling stage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cai.config import RunConfig
    from cai.runs import RunDir, StageDir
    from cai.tracking import StageTracking

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


class ModelPool:
    """Backends by spec, created on first use and shared between stages and roles (policy == feedback loads
    once)."""

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
    """What a stage gets: the config, the run folder, its own stage folder, shared models, flags, and where it
    reports to (trainers take ``tracking``; a stage logs its own numbers with ``cai.tracking.Tracker``)."""

    config: RunConfig
    run: RunDir
    stage: StageDir
    pool: ModelPool
    force: bool = False
    progress: bool = True
    tracking: StageTracking | None = None
