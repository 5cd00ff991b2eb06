"""What a training run logs besides TRL's own files: per-step CSV rows and the curves drawn from them or from
the trainer's log history."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path


def append_rows(csv_path: Path, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Append ``rows`` to a CSV file, writing ``header`` first when the file is new."""
    new = not Path(csv_path).exists()
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        if new:
            w.writerow(header)
        w.writerows(rows)


def read_steps(csv_path: Path) -> list[dict]:
    if not Path(csv_path).exists():
        return []
    with open(csv_path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def step_logger(csv_path: Path, keys: dict[str, str]):
    """A TrainerCallback writing one CSV row per logging step: ``keys`` maps CSV column -> TRL log key."""
    from transformers import TrainerCallback

    class StepLogger(TrainerCallback):
        last = max((int(r["step"]) for r in read_steps(csv_path)), default=-1)  # resumed runs re-log no step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs or not any(k in logs for k in keys.values()):
                return
            if state.global_step <= self.last:
                return
            self.last = state.global_step
            append_rows(csv_path, ["step", *keys], [[state.global_step, *(logs.get(k, "") for k in keys.values())]])

    return StepLogger()


def trend(csv_path: Path, column: str) -> dict:
    """First-half vs second-half mean of a logged column (did it go up?)."""
    vals = [float(r[column]) for r in read_steps(csv_path) if r.get(column) not in ("", None)]
    if len(vals) < 2:
        return {"first_half": None, "second_half": None, "delta": None}
    h = len(vals) // 2
    a, b = sum(vals[:h]) / h, sum(vals[h:]) / (len(vals) - h)
    return {"first_half": a, "second_half": b, "delta": b - a, "first": vals[0], "last": vals[-1]}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, png: Path) -> None:
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    _pyplot().close(fig)


def plot_curves(csv_path: Path, columns: Sequence[str], png: Path, title: str) -> Path | None:
    """Plot the given CSV columns against step, one panel each."""
    rows = read_steps(csv_path)
    if not rows:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.2), squeeze=False)
    for ax, col in zip(axes[0], columns, strict=False):
        pts = [(int(r["step"]), float(r[col])) for r in rows if r.get(col) not in ("", None)]
        if pts:
            ax.plot(*zip(*pts, strict=False), marker="o", ms=3)
        if col == "reward_mean" and all(r.get("reward_std") not in ("", None) for r in rows):
            x = [int(r["step"]) for r in rows]
            m, sd = [float(r[col]) for r in rows], [float(r["reward_std"]) for r in rows]
            ax.fill_between(
                x,
                [a - b for a, b in zip(m, sd, strict=False)],
                [a + b for a, b in zip(m, sd, strict=False)],
                alpha=0.2,
                label="± std within step",
            )
            ax.legend(fontsize=7)
        ax.set_title(col)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    _save(fig, png)
    return png


def plot_loss(log_history: list[dict], png: Path, title: str) -> None:
    """Train loss per step and eval loss points from a trainer's log history, as a PNG."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = _pyplot().subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=False), "o-", label="held-out eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend()
    _save(fig, png)
