"""The RL reward trend read per prompt: first visit vs last visit, paired over prompts."""

from __future__ import annotations

import json

import pytest
from scipy import stats

from cai.training.reward_trend import describe, paired_reward_trend, read_rewards, visits


def _rows(gains: dict[str, float], passes: int = 3, per_visit: int = 2, start: float = 0.4):
    """Each prompt visited ``passes`` times (one step per pass and prompt), its reward growing by ``gain`` per pass."""
    rows, step = [], 0
    for k in range(passes):
        for p, gain in gains.items():
            step += 1
            rows += [(step, p, start + gain * k + 0.01 * j) for j in range(per_visit)]
    return rows


def test_visits_average_a_steps_completions_in_step_order():
    rows = [(3, "a", 1.0), (1, "a", 0.2), (1, "a", 0.4), (2, "b", 0.5)]
    assert visits(rows) == {"a": [(1, pytest.approx(0.3)), (3, 1.0)], "b": [(2, 0.5)]}


def test_paired_trend_is_last_minus_first_visit_over_prompts():
    gains = {"p1": 0.10, "p2": 0.05, "p3": 0.15, "p4": 0.0, "p5": 0.20, "p6": 0.10}
    t = paired_reward_trend(_rows(gains) + [(99, "once", 0.9)])
    diffs = [2 * g for g in gains.values()]  # three passes: last - first = 2 gains
    assert t["n_prompts"] == 6 and t["visited_once"] == 1
    assert t["delta"] == pytest.approx(sum(diffs) / 6)
    assert t["first_pass"] == pytest.approx(0.405) and t["last_pass"] == pytest.approx(0.405 + sum(diffs) / 6)
    half = stats.t.ppf(0.975, 5) * stats.tstd(diffs) / 6**0.5
    assert t["ci_low"] == pytest.approx(t["delta"] - half) and t["ci_high"] == pytest.approx(t["delta"] + half)
    assert t["p_wilcoxon"] == pytest.approx(stats.wilcoxon([d for d in diffs if d]).pvalue)
    assert t["mean_first_step"] < t["mean_last_step"]
    line = describe(t)
    assert line.startswith("reward on the same 6 prompts, first pass 0.405 -> last pass") and "Wilcoxon p" in line


def test_groups_split_the_trend_and_a_flat_policy_is_not_called_rising():
    rows = _rows({"h1": 0.1, "h2": 0.2, "h3": 0.1, "b1": 0.0, "b2": 0.0, "b3": 0.0})
    t = paired_reward_trend(rows, {"h1": "harmful", "h2": "harmful", "h3": "harmful", "b1": "benign",
                                   "b2": "benign", "b3": "benign"})
    assert t["groups"]["harmful"]["delta"] == pytest.approx(0.8 / 3)
    assert t["groups"]["benign"]["delta"] == 0 and t["groups"]["benign"]["p_wilcoxon"] == 1.0


def test_no_prompt_seen_twice_says_so(tmp_path):
    t = paired_reward_trend([(1, "a", 0.5), (2, "b", 0.6)])
    assert t["n_prompts"] == 0 and t["delta"] is None and t["visited_once"] == 2
    assert "no prompt was visited twice" in describe(t)
    assert read_rewards(tmp_path / "missing.csv") == []


def test_report_shows_the_reward_trend(tmp_path):
    from cai.evaluation.report import write_report

    run = tmp_path / "r"
    (run / "rl").mkdir(parents=True)
    trend = paired_reward_trend(_rows({"a": 0.1, "b": 0.2, "c": 0.1}), {"a": "harmful", "b": "harmful", "c": "benign"})
    (run / "rl" / "manifest.json").write_text(json.dumps({"status": "complete", "counts": {"reward_paired": trend}}))
    (run / "prompts").mkdir()
    (run / "prompts" / "manifest.json").write_text(json.dumps({"status": "complete", "counts": {}}))
    write_report([run], tmp_path / "out")
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## RL reward trend (r)" in md and "- reward on the same 3 prompts" in md and "- harmful: reward on" in md
    assert "<h3>RL reward trend</h3>" in (tmp_path / "out" / "report.html").read_text()
