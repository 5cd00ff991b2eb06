"""Fields every experiment config has, and reading an experiment's YAML."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, Field

from cai.base_config import SEED_MAX, GreedyGenerationConfig, Strict, config_file, validate_yaml
from cai.experiments.pools import PromptPoolConfig

C = TypeVar("C", bound=BaseModel)


class ExperimentConfig(Strict):
    """Fields every experiment config has."""

    name: str
    seed: int = Field(0, ge=0, le=SEED_MAX)
    runs_dir: str = "runs"
    policy: str = Field("smollm2-135m", description="the starting model spec (in-process)")
    constitution: str = Field("harmless", description="its refusal_style writes the refusals of the safety data")
    batch_size: int = Field(16, ge=1, description="generation batch size")
    prompts: PromptPoolConfig = Field(default_factory=PromptPoolConfig)
    decode: GreedyGenerationConfig = Field(
        default_factory=GreedyGenerationConfig, description="decoding for data generation and evaluation (greedy)"
    )
    judge: str = Field("refusal", description="judge for evaluate_model / prefill_attack")


def load_experiment_config(cls: type[C], path: str | Path, overrides: Sequence[str] = ()) -> C:
    """Read an experiment config (a bundled name such as ``backdoor``, or a YAML file) into ``cls``, applying
    ``--set key.sub=value`` overrides; errors name the key."""
    return validate_yaml(cls, config_file(path, "experiment"), overrides)
