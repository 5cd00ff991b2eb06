"""Experiment tracking: the run config's ``tracking`` section, passed to every TRL trainer and used by our own
stages to log their numbers (feedback diagnostics, critique stats, eval metrics) to the same trackers.

Off by default (``report_to: []``): the run folder is the record. Each stage reports under its own name,
``<run_name>/<stage>``; TensorBoard writes its event files into the run folder, ``<run>/tracking/<stage>/``, so
``tensorboard --logdir runs/<name>/tracking`` shows a whole run offline. trackio, wandb and mlflow keep their own
stores (their usual environment variables apply); ``project`` names the project / experiment there.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from cai.base_config import Strict
from cai.errors import UserError

log = logging.getLogger(__name__)

# tracker -> (the module it needs, how to install it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "pip install 'cai-lab[tracking]'"),
    "trackio": ("trackio", "pip install trackio"),
    "wandb": ("wandb", "pip install wandb"),
    "mlflow": ("mlflow", "pip install mlflow"),
}
DEFAULT_PROJECT = "cai-lab"


class TrackingConfig(Strict):
    """Config section ``tracking``: where training curves and stage metrics are reported (besides the run folder)."""

    report_to: list[str] = Field(default_factory=list, description="any of tensorboard, trackio, wandb, mlflow")
    project: str | None = Field(None, description="project / experiment name in the tracker (null: cai-lab)")
    run_name: str | None = Field(None, description="the tracker's run name (null: the run's name)")

    @field_validator("report_to", mode="before")
    @classmethod
    def _known_trackers(cls, value: Any) -> Any:
        if isinstance(value, str):  # `--set tracking.report_to=tensorboard`: one tracker
            value = [value]
        if isinstance(value, list):
            unknown = [v for v in value if v not in TRACKERS]
            if unknown:
                raise ValueError(f"unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} (or [] for none)")
        return value


def require_trackers(report_to: list[str] | tuple[str, ...]) -> None:
    """Fail before any work when a configured tracker's package is missing: a one-line UserError naming what to
    install."""
    for name in report_to:
        module, install = TRACKERS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(
                f"tracking.report_to lists {name}, but {module} is not installed: {install} "
                f"(or remove {name} from tracking.report_to)"
            ) from None


@dataclass(frozen=True)
class StageTracking:
    """Where one stage reports: the trackers, its TensorBoard folder and its run name in the tracker."""

    report_to: tuple[str, ...]
    log_dir: Path
    run_name: str
    project: str = DEFAULT_PROJECT

    @classmethod
    def for_stage(cls, config: TrackingConfig, run_root: Path, run_name: str, stage: str) -> StageTracking:
        return cls(
            tuple(config.report_to),
            Path(run_root) / "tracking" / stage,
            f"{config.run_name or run_name}/{stage}",
            config.project or DEFAULT_PROJECT,
        )

    def trainer_args(self) -> dict[str, Any]:
        """TRL/transformers arguments: ``report_to`` (TensorBoard goes through :meth:`trainer_callbacks` instead, so
        its events land in ``log_dir`` rather than under the checkpoints), ``run_name`` and ``project``."""
        if not self.report_to:
            return {"report_to": []}
        # wandb and mlflow read their project from the environment (transformers' callbacks do); the user's own
        # setting wins
        if "wandb" in self.report_to:
            os.environ.setdefault("WANDB_PROJECT", self.project)
        if "mlflow" in self.report_to:
            os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", self.project)
        return {
            "report_to": [t for t in self.report_to if t != "tensorboard"],
            "run_name": self.run_name,
            "project": self.project,
        }

    def trainer_callbacks(self) -> list:
        """TensorBoard as a trainer callback writing into ``log_dir``."""
        if "tensorboard" not in self.report_to:
            return []
        from transformers.integrations import TensorBoardCallback

        callback = TensorBoardCallback()
        # its folder otherwise comes from $TENSORBOARD_LOGGING_DIR or output_dir/runs/<date>_<host>, also when it
        # reopens its writer to log the evaluation that follows training
        callback.logging_dir = str(self.log_dir)
        return [callback]


def trainer_args(tracking: StageTracking | None) -> dict[str, Any]:
    """A trainer's tracking arguments (:meth:`StageTracking.trainer_args`); nothing reported without tracking."""
    return {"report_to": []} if tracking is None else tracking.trainer_args()


def trainer_callbacks(tracking: StageTracking | None) -> list:
    """A trainer's tracking callbacks (:meth:`StageTracking.trainer_callbacks`); none without tracking."""
    return [] if tracking is None else tracking.trainer_callbacks()


def scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers in a (nested) summary as flat ``a/b`` tags; text, lists and booleans are left out."""
    out: dict[str, float] = {}
    for key, value in values.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(scalars(value, tag))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[tag] = float(value)
    return out


class Tracker:
    """Logs a stage's own scalars to the configured trackers; does nothing when none is configured. Use it as a
    context manager (it closes the trackers' runs)."""

    def __init__(self, tracking: StageTracking | None):
        self.tracking = tracking
        self._sinks: list[Any] = []
        if tracking is None:
            return
        for name in tracking.report_to:
            self._sinks.append(_open(name, tracking))

    def log(self, values: Mapping[str, Any], step: int = 0) -> None:
        flat = scalars(values)
        if flat:
            for sink in self._sinks:
                sink.log(flat, step)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _open(name: str, t: StageTracking) -> Any:
    require_trackers([name])
    return {"tensorboard": _TensorBoard, "trackio": _Trackio, "wandb": _Wandb, "mlflow": _MLflow}[name](t)


class _TensorBoard:
    def __init__(self, t: StageTracking):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(t.log_dir))

    def log(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, t: StageTracking):
        import wandb

        self.run = wandb.init(project=t.project, name=t.run_name, dir=str(t.log_dir.parent))

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, t: StageTracking):
        import trackio

        self.trackio = trackio
        trackio.init(project=t.project, name=t.run_name)

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _MLflow:
    def __init__(self, t: StageTracking):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(t.project)
        mlflow.start_run(run_name=t.run_name)

    def log(self, values: dict[str, float], step: int) -> None:
        # mlflow metric names allow letters, digits, _ - . / and spaces
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()
