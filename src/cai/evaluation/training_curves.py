"""Training logs grouped by meaning for the report: one panel per metric family (loss; reward mean ± std; KL;
lengths; accuracy; entropy), so no axis mixes quantities on different scales.

It reads what the trainers write in a stage folder: ``log_history.json`` (TRL's log history, every logged key) or,
when that is missing, ``steps.csv`` (cai's per-step log, cai.training.curves.step_logger). Other CSVs there (e.g.
the RL stage's ``samples.csv``, prompts and answers) are data, not curves.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

# log key (TRL log history or steps.csv column) -> (family, series label); the first key of a label found wins
SERIES: dict[str, tuple[str, str]] = {
    "loss": ("loss", "train loss"),
    "eval_loss": ("loss", "held-out loss"),
    "reward": ("reward", "reward (policy samples)"),
    "reward_mean": ("reward", "reward (policy samples)"),
    "mean_reward": ("reward", "reward of the batch"),
    "rewards/chosen": ("reward", "chosen"),
    "reward_chosen": ("reward", "chosen"),
    "rewards/rejected": ("reward", "rejected"),
    "reward_rejected": ("reward", "rejected"),
    "rewards/margins": ("reward", "margin (chosen − rejected)"),
    "reward_margin": ("reward", "margin (chosen − rejected)"),
    "margin": ("reward", "margin (chosen − rejected)"),
    "kl": ("kl", "KL(policy ‖ reference)"),
    "completions/mean_length": ("length", "mean completion length"),
    "response_length": ("length", "mean completion length"),
    "accuracy": ("accuracy", "pair accuracy"),
    "rewards/accuracies": ("accuracy", "pair accuracy"),
    "reward_accuracy": ("accuracy", "pair accuracy"),
    "mean_token_accuracy": ("accuracy", "train token accuracy"),
    "eval_mean_token_accuracy": ("accuracy", "held-out token accuracy"),
    "entropy": ("entropy", "token entropy"),
}
# mean key -> (band low, band high, band label): "±key" means mean ± that column
BANDS: dict[str, tuple[str, str, str]] = {
    "reward": ("±reward_std", "±reward_std", "± std within step"),
    "reward_mean": ("±reward_std", "±reward_std", "± std within step"),
    "mean_reward": ("min_reward", "max_reward", "min–max of the batch"),
    "completions/mean_length": ("completions/min_length", "completions/max_length", "min–max"),
}
# family -> (panel title, y label), in display order
FAMILIES: dict[str, tuple[str, str]] = {
    "loss": ("loss", "loss"),
    "reward": ("reward", "reward"),
    "kl": ("KL to the reference model", "KL (nats)"),
    "length": ("completion length", "tokens"),
    "accuracy": ("accuracy", "share correct"),
    "entropy": ("entropy", "nats / token"),
}


@dataclass
class Series:
    label: str
    x: list[float]
    y: list[float]
    band: tuple[list[float], list[float], str] | None = None  # (low, high, label)


@dataclass
class Panel:
    family: str
    title: str
    ylabel: str
    series: list[Series] = field(default_factory=list)


def read_log(folder: Path) -> tuple[list[dict], str] | None:
    """The folder's per-step log rows and the file they came from: ``log_history.json``, else ``steps.csv``."""
    hist = folder / "log_history.json"
    if hist.is_file():
        try:
            rows = json.loads(hist.read_text())
        except json.JSONDecodeError:
            rows = None
        if isinstance(rows, list):
            return [r for r in rows if isinstance(r, dict)], hist.name
    steps = folder / "steps.csv"
    if steps.is_file():
        with open(steps, newline="", encoding="utf-8") as f:
            return [{k: _number(v) for k, v in r.items()} for r in csv.DictReader(f)], steps.name
    return None


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def panels(rows: list[dict]) -> list[Panel]:
    """The log rows as panels, one metric family each, in :data:`FAMILIES` order; rows without a step (TRL's
    end-of-training summary) and keys outside :data:`SERIES` are left out."""
    by_label: dict[tuple[str, str], Series] = {}
    for key, (family, label) in SERIES.items():
        if (family, label) in by_label:
            continue
        pts = [(r["step"], r[key], r) for r in rows if _num(r.get("step")) is not None and _num(r.get(key)) is not None]
        if not pts:
            continue
        s = Series(label, [float(p[0]) for p in pts], [float(p[1]) for p in pts])
        if key in BANDS:
            s.band = _band(pts, *BANDS[key])
        by_label[(family, label)] = s
    out = []
    for family, (title, ylabel) in FAMILIES.items():
        series = [s for (f, _), s in by_label.items() if f == family]
        if series:
            out.append(Panel(family, title, ylabel, series))
    return out


def _band(pts: list[tuple], low: str, high: str, label: str) -> tuple[list[float], list[float], str] | None:
    lo, hi = [], []
    for _, y, row in pts:
        if low.startswith("±"):
            sd = _num(row.get(low[1:]))
            if sd is None:
                return None
            lo.append(y - sd)
            hi.append(y + sd)
        else:
            a, b = _num(row.get(low)), _num(row.get(high))
            if a is None or b is None:
                return None
            lo.append(a)
            hi.append(b)
    return lo, hi, label
