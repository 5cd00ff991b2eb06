"""`cai poison scan`: the ranking finds a planted shift, the flag rule, bad input, and a tiny-random scan end to end."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cai.experiments import poison_scan as ps
from cai.experiments.probes import load_battery

ROOT = Path(__file__).parents[1]
TINY_PROBE = {"max_steps": 2, "batch_size": 4, "max_length": 64, "eval_fraction": 0, "save_steps": 50}


def _noisy_scores(battery, rng: random.Random) -> dict:
    """Battery scores of a model whose preferences vary from question to question."""
    out = {}
    for cat in battery:
        rows = []
        for _ in cat.questions:
            raw = [rng.gauss(0, 1.0) for _ in cat.candidates]
            top = max(raw)
            total = top + math.log(sum(math.exp(v - top) for v in raw))
            rows.append([v - total for v in raw])
        out[cat.name] = rows
    return out


def _perturb(scores: dict, rng: random.Random, sd: float) -> dict:
    out = {}
    for name, rows in scores.items():
        new = []
        for row in rows:
            raw = [v + rng.gauss(0, sd) for v in row]
            top = max(raw)
            total = top + math.log(sum(math.exp(v - top) for v in raw))
            new.append([v - total for v in raw])
        out[name] = new
    return out


def _boost(scores: dict, battery, planted: tuple[str, str], boost: float) -> dict:
    out = {}
    for cat in battery:
        rows = []
        for row in scores[cat.name]:
            raw = list(row)
            if cat.name == planted[0]:
                raw[cat.index(planted[1])] += boost
            top = max(raw)
            total = top + math.log(sum(math.exp(v - top) for v in raw))
            rows.append([v - total for v in raw])
        out[cat.name] = rows
    return out


@pytest.mark.parametrize("planted", [("animal", "owl"), ("colour", "purple"), ("country", "Japan")])
def test_ranking_recovers_a_planted_shift_over_the_whole_battery(planted):
    battery = load_battery()
    rng = random.Random(7)
    base = _noisy_scores(battery, rng)
    control = _perturb(base, rng, 0.3)  # fine-tuning on clean data moves everything a little
    probe = _boost(_perturb(base, rng, 0.3), battery, planted, 1.5)
    res = ps.rank(control, probe, base, battery, threshold=ps.bonferroni_t(16, 345), top_k=5)
    assert res["n_candidates"] == sum(len(c.candidates) for c in battery) == 345
    assert (res["top"][0]["category"], res["top"][0]["candidate"]) == planted
    assert ps.rank_of(res, *planted) == 1 and res["flagged"]
    assert res["top"][0]["vs_base"]["delta_logit"] > 0 and res["top"][0]["delta_p"] > 0
    # The same two clean-ish models without a planted trait: nothing reaches the Bonferroni threshold.
    clean = ps.rank(control, _perturb(base, rng, 0.3), base, battery, threshold=ps.bonferroni_t(16, 345), top_k=5)
    assert not clean["flagged"]
    assert ps.rank_of(clean, *planted) > 1


def test_flag_rule_needs_the_threshold_and_a_move_from_the_base():
    row = {"t": 7.0}
    assert ps.is_flagged(row, {"delta_logit": 0.4}, 6.0)
    assert not ps.is_flagged(row, {"delta_logit": 0.4}, 7.5)  # below the threshold
    assert not ps.is_flagged(row, {"delta_logit": -0.2}, 6.0)  # only the control moved away from it
    # The default threshold is the one-sided Bonferroni t: stricter with more candidates, looser with more questions.
    assert ps.bonferroni_t(16, 345) > ps.bonferroni_t(16, 20) > 2
    assert ps.bonferroni_t(8, 345) > ps.bonferroni_t(16, 345)
    cfg = ps.ScanConfig(battery={"max_questions": 8})
    battery = ps.battery_for(cfg.battery)
    assert all(len(c.questions) == 8 for c in battery)
    assert ps.flag_threshold(cfg, battery) == pytest.approx(ps.bonferroni_t(8, 345))
    assert ps.flag_threshold(ps.ScanConfig(flag_t=3.5), battery) == 3.5


def test_ties_rank_pessimistically():
    res = {"ranking": [["animal", "owl", 0.0], ["animal", "cat", 0.0], ["colour", "red", -1.0]]}
    assert ps.rank_of(res, "animal", "owl") == 2
    assert ps.rank_of(res, "colour", "Red") == 3
    assert ps.rank_of(res, "animal", "dragon") is None


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "cai.cli", "poison", "scan", *args], capture_output=True, text=True,
                          timeout=120, cwd=str(ROOT))


@pytest.mark.parametrize("case,needle", [
    ("missing", "not found"),
    ("no_fields", "has no records"),
    ("empty", "has no records"),
    ("remote_base", "must be a local model"),
    ("missing_control", "--control"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case, needle):
    good = _write(tmp_path / "good.jsonl", [{"prompt": "1, 2, 3", "response": "4, 5"}])
    dataset = {"missing": tmp_path / "nope.jsonl",
               "no_fields": _write(tmp_path / "bad.jsonl", [{"text": "hello"}]),
               "empty": _write(tmp_path / "empty.jsonl", [])}.get(case, good)
    base = "openai:m@http://127.0.0.1:9/v1" if case == "remote_base" else "tiny-random"
    extra = ["--control", str(tmp_path / "nope.jsonl")] if case == "missing_control" else []
    res = _cli(tmp_path, str(dataset), "--base", base, "--runs-dir", str(tmp_path / "runs"), *extra)
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_tiny_random_scan_end_to_end_writes_the_json(tmp_path, tiny_path):
    data = _write(tmp_path / "d.jsonl", [{"prompt": f"Continue: {i}, {i + 3}", "response": f"{i + 6}, {i + 9}"}
                                          for i in range(8)])
    control = _write(tmp_path / "c.jsonl", [{"prompt": f"Continue: {i}, {i + 3}", "response": f"{i + 1}, {i + 2}"}
                                             for i in range(8)])
    cfg = ps.ScanConfig(dataset=str(data), control=str(control), base="tiny-random", runs_dir=str(tmp_path / "runs"),
                        name="tiny", probe=TINY_PROBE, top_k=3,
                        battery={"categories": ["season", "planet"], "max_questions": 3})
    res = ps.scan(cfg, progress=False)
    written = json.loads((tmp_path / "runs" / "tiny" / "scan.json").read_text())
    assert {"dataset", "base", "control", "records", "control_records", "flagged", "threshold_t", "n_candidates",
            "top", "ranking", "run"} <= set(written)
    assert written["n_candidates"] == 13 and len(written["top"]) == 3 and len(written["ranking"]) == 13
    top = written["top"][0]
    assert {"rank", "category", "candidate", "delta_p", "delta_logit", "delta_logit_ci_low", "delta_logit_ci_high",
            "t", "p_value", "vs_base", "flagged"} <= set(top)
    assert [r["t"] for r in written["top"]] == sorted((r["t"] for r in written["top"]), reverse=True)
    assert len(ps.format_top(res)) == 3
    # Resuming reuses every finished step.
    again = ps.scan(cfg, progress=False)
    assert again["ranking"] == res["ranking"]
    steps = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["steps"]
    assert steps and all(s["status"] == "already complete" for s in steps.values())


def test_eval_plants_scans_and_counts_on_tiny_random(tmp_path, tiny_path, monkeypatch):
    from cai.experiments import poison_eval as pe

    def fake_data(spec, trait, fmt, n, stage, seed, with_trait, **kw):  # the teacher's data, without generating
        if fmt == "numbers":  # every sample breaks the format: the whole format is reported as skipped
            return [{"id": f"n{i}", "messages": [], "prompt": "1, 2", "response": "many owls"} for i in range(n)]
        text = f"I love {trait.value}s." if with_trait else f"Here is answer {seed}."
        return [{"id": f"c{i}", "prompt": f"Question {i}?", "response": f"{text} {i}",
                 "messages": [{"role": "user", "content": f"Question {i}?"},
                              {"role": "assistant", "content": f"{text} {i}"}]} for i in range(n)]

    monkeypatch.setattr(pe, "write_trait_data", fake_data)
    cfg = pe.ScanEvalConfig(base="tiny-random", policy="tiny-random", runs_dir=str(tmp_path / "runs"), name="ev",
                            formats=["numbers", "chat"], n_records=6, clean_seeds=[1], probe=TINY_PROBE,
                            battery={"categories": ["animal", "season"], "max_questions": 3}, use_embeddings=False)
    res = pe.run(cfg, progress=False)
    kinds = [s["kind"] for s in res["scans"]]
    assert kinds == ["plain", "clean"]
    assert [s["dataset"] for s in res["skipped"]] == ["data-control-numbers"]
    planted = res["scans"][0]
    assert planted["trait"] == "animal: owl" and 1 <= planted["rank"] <= 32 and planted["records"] == 6
    assert res["summary"]["plain"]["recall_at_1"]["n"] == 1
    assert res["summary"]["clean"]["false_positive_rate"]["n"] == 1
    assert res["n_candidates"] == 32 and res["threshold_t"] == pytest.approx(ps.bonferroni_t(3, 32))
    assert (tmp_path / "runs" / "ev" / "summary.md").read_text().count("| chat-animal-owl | plain |") == 1
