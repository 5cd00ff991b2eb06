"""Typed run configs (YAML on disk). Unknown keys, wrong types and missing files are one-line errors that name
the file, the key and what was expected.

Each stage owns its config section: the class lives in the stage's module and is listed in ``RunConfig``; the
stage names come from the registry in :mod:`cai.stages`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator

from cai.base_config import (  # noqa: F401  (re-exported: the shared sections and helpers)
    SEED_MAX,
    BenignSourceConfig,
    GenerationConfig,
    ModelsConfig,
    PromptSourceConfig,
    Strict,
    config_file,
    format_validation_error,
    load_yaml,
    parse_override,
    validate_yaml,
)
from cai.stages import STAGES
from cai.stages.classify import ClassifyConfig
from cai.stages.critique import CritiqueConfig
from cai.stages.eval import EvalConfig
from cai.stages.preferences import PreferencesConfig
from cai.stages.rl import RLStageConfig
from cai.stages.sft import SFTStageConfig
from cai.tracking import TrackingConfig
from cai.training.dpo import DPOTrainConfig
from cai.training.reward import RewardTrainConfig


class RunConfig(Strict):
    """A whole pipeline run. ``stages`` lists what ``cai run`` executes, in order."""

    name: str = "quickstart"
    seed: int = Field(0, ge=0, le=SEED_MAX)
    runs_dir: str = "runs"
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    constitution: str = "harmless"
    prompts: PromptSourceConfig = Field(default_factory=PromptSourceConfig)
    benign: BenignSourceConfig | None = Field(default_factory=BenignSourceConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    classify: ClassifyConfig = Field(default_factory=ClassifyConfig)
    critique: CritiqueConfig = Field(default_factory=CritiqueConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    preferences: PreferencesConfig = Field(default_factory=PreferencesConfig)
    reward: RewardTrainConfig = Field(default_factory=RewardTrainConfig)
    rl: RLStageConfig = Field(default_factory=RLStageConfig)
    dpo: DPOTrainConfig = Field(default_factory=DPOTrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    # where training curves and stage metrics are also reported; not part of any stage's config (its hash), since
    # it changes no result: turning a tracker on reuses the finished stages
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    stages: list[str] = Field(default_factory=lambda: ["prompts", "generate"])

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
        if not v:
            raise ValueError("at least one stage is required")
        return v

    def section(self, stage: str) -> dict[str, Any]:
        """The config a stage's manifest records: what every stage depends on, plus the sections of this stage
        and of every stage before it in ``stages`` (so changing an upstream stage invalidates downstream ones)."""
        base = {
            "seed": self.seed,
            "models": self.models.model_dump(),
            "constitution": self.constitution,
            "prompts": self.prompts.model_dump(),
            "benign": self.benign.model_dump() if self.benign else None,
            "generation": self.generation.model_dump(),
        }
        upstream = self.stages[: self.stages.index(stage) + 1] if stage in self.stages else [stage]
        for name in upstream:
            own = getattr(self, name, None)
            if isinstance(own, BaseModel):
                base[name] = own.model_dump()
        return base


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a run config from a bundled name (``quickstart``) or a YAML file (defaults when ``path`` is None),
    applying ``--set`` overrides."""
    return validate_yaml(RunConfig, None if path is None else config_file(path, "run"), overrides or [])
