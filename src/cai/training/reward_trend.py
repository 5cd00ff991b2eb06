"""Is the RL reward rising? The same prompts' reward on their first pass vs their last pass.

The per-step reward mean (steps.csv) mixes two things: how good the policy is, and which prompts the step drew.
With 4 of 32 prompts a step, the draw dominates: on the rl-demo run the first and last quarters' step means
differed by +0.02 ± 0.08 (p = 0.62) although the trained policy complied with 18 points fewer harmful requests.
So every completion's reward is logged (``rewards.csv``: step, prompt, reward), and the trend is read per prompt:
its mean reward over the completions of its first visit vs those of its last visit, a paired difference over
prompts with a t-interval and a Wilcoxon signed-rank p. Prompts visited once give no pair and are counted.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

from cai.evaluation.metrics import t_summary
from cai.evaluation.paired import format_p

REWARDS_CSV = "rewards.csv"
COLUMNS = ("step", "prompt", "reward")


def read_rewards(path: Path) -> list[tuple[int, str, float]]:
    """(step, prompt, reward) rows of a run's rewards.csv ([] when it is missing)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [(int(r["step"]), r["prompt"], float(r["reward"])) for r in csv.DictReader(f)]


def visits(rows: Sequence[tuple[int, str, float]]) -> dict[str, list[tuple[int, float]]]:
    """Per prompt, its visits in step order: (step, mean reward of that step's completions of the prompt)."""
    by: dict[str, dict[int, list[float]]] = {}
    for step, prompt, reward in rows:
        by.setdefault(prompt, {}).setdefault(step, []).append(reward)
    return {p: [(s, sum(v) / len(v)) for s, v in sorted(steps.items())] for p, steps in by.items()}


def _pair_stats(diffs: Sequence[float], first: Sequence[float], last: Sequence[float]) -> dict:
    from scipy import stats

    s = t_summary(diffs)
    nonzero = [d for d in diffs if d != 0]
    p = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) >= 2 else 1.0
    return {
        "n_prompts": len(diffs),
        "first_pass": sum(first) / len(first) if first else None,
        "last_pass": sum(last) / len(last) if last else None,
        "delta": s["mean"] if diffs else None,
        "ci_low": s["ci_low"] if len(diffs) > 1 else None,
        "ci_high": s["ci_high"] if len(diffs) > 1 else None,
        "p_wilcoxon": p,
    }


def paired_reward_trend(rows: Sequence[tuple[int, str, float]], groups: Mapping[str, str] | None = None) -> dict:
    """First-pass vs last-pass reward over the prompts visited at least twice (see the module docstring), overall
    and per group (e.g. harmful / benign) when ``groups`` maps prompts to group names."""
    per = visits(rows)
    paired = {p: (v[0], v[-1]) for p, v in per.items() if len(v) >= 2}
    out: dict = {
        **_pair_stats(
            [b[1] - a[1] for a, b in paired.values()],
            [a[1] for a, _ in paired.values()],
            [b[1] for _, b in paired.values()],
        ),
        "visited_once": len(per) - len(paired),
        "mean_first_step": sum(a[0] for a, _ in paired.values()) / len(paired) if paired else None,
        "mean_last_step": sum(b[0] for _, b in paired.values()) / len(paired) if paired else None,
    }
    if groups:
        out["groups"] = {}
        for g in sorted(set(groups.values())):
            mine = [(a, b) for p, (a, b) in paired.items() if groups.get(p) == g]
            out["groups"][g] = _pair_stats(
                [b[1] - a[1] for a, b in mine], [a[1] for a, _ in mine], [b[1] for _, b in mine]
            )
    return out


def describe(trend: Mapping) -> str:
    """One line for logs and reports, e.g. "reward on the same 32 prompts, first pass 0.41 -> last pass 0.55:
    +0.14 [+0.07, +0.21], Wilcoxon p = 0.001"."""
    if not trend.get("n_prompts"):
        return "reward trend: no prompt was visited twice (more steps, or fewer prompts, give a paired trend)"
    ci = f" [{trend['ci_low']:+.3f}, {trend['ci_high']:+.3f}]" if trend.get("ci_low") is not None else ""
    return (
        f"reward on the same {trend['n_prompts']} prompts, first pass {trend['first_pass']:.3f} -> last pass "
        f"{trend['last_pass']:.3f}: {trend['delta']:+.3f}{ci}, Wilcoxon p = {format_p(trend['p_wilcoxon'])}"
    )
