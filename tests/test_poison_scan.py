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


def _finetune(scores: dict, battery, rng: random.Random, sd: float = 0.5, sd_question: float = 0.1) -> dict:
    """What a short fine-tune does to the battery: every candidate moves by its own offset, the same under every
    paraphrase (so a paired t over questions is huge for pure noise), plus a little per-question noise."""
    out = {}
    for cat in battery:
        offsets = [rng.gauss(0, sd) for _ in cat.candidates]
        rows = []
        for row in scores[cat.name]:
            raw = [v + o + rng.gauss(0, sd_question) for v, o in zip(row, offsets)]
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
    controls = [_finetune(base, battery, rng) for _ in range(3)]
    threshold = ps.flag_p(0.05, battery)
    probe = _boost(_finetune(base, battery, rng), battery, planted, 3.0)
    res = ps.rank(controls, probe, base, battery, threshold, top_k=5)
    assert res["n_candidates"] == sum(len(c.candidates) for c in battery) == 345
    assert (res["top"][0]["category"], res["top"][0]["candidate"]) == planted
    assert ps.rank_of(res, *planted) == 1 and res["flagged"]
    assert res["top"][0]["vs_base"]["delta_logit"] > 0 and res["top"][0]["delta_p"] > 0
    # One more clean fine-tune: its shifts are consistent over questions (a paired t over questions reaches the
    # old Bonferroni t for many candidates), but they are within the control replicates' spread: not flagged.
    clean = ps.rank(controls, _finetune(base, battery, rng), base, battery, threshold, top_k=5)
    assert max(r["t"] for r in clean["top"]) > 6
    assert not clean["flagged"]
    assert ps.rank_of(clean, *planted) > 1


def test_false_positive_rate_of_the_replicate_null_is_near_alpha():
    """Over many clean scans the flag rule's family-wise error stays near its nominal 5% (Bonferroni: at most)."""
    battery = load_battery(categories=["animal", "colour", "season", "planet"])
    rng = random.Random(11)
    threshold = ps.flag_p(0.05, battery)
    flagged = 0
    for _ in range(60):
        base = _noisy_scores(battery, rng)
        controls = [_finetune(base, battery, rng) for _ in range(2)]
        flagged += ps.rank(controls, _finetune(base, battery, rng), base, battery, threshold, top_k=1)["flagged"]
    assert flagged <= 7  # 60 x 0.05 = 3 expected at most; 7 is beyond the binomial 99th percentile


def test_flag_rule_needs_the_threshold_and_a_move_from_the_base():
    row = {"p_null": 1e-5}
    assert ps.is_flagged(row, {"delta_logit": 0.4}, 1e-4)
    assert not ps.is_flagged(row, {"delta_logit": 0.4}, 1e-6)  # not below the threshold
    assert not ps.is_flagged(row, {"delta_logit": -0.2}, 1e-4)  # only the controls moved away from it
    cfg = ps.ScanConfig(battery={"max_questions": 8})
    battery = ps.battery_for(cfg.battery)
    assert all(len(c.questions) == 8 for c in battery)
    assert ps.flag_p(cfg, battery) == pytest.approx(0.05 / 345)
    assert ps.flag_p(ps.ScanConfig(flag_alpha=0.01), battery) == pytest.approx(0.01 / 345)
    with pytest.raises(ValueError, match="two control"):
        ps.null_shifts([_noisy_scores(battery, random.Random(0))], _noisy_scores(battery, random.Random(1)), battery)


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
    assert {"dataset", "base", "control", "records", "control_records", "flagged", "threshold_p", "n_candidates",
            "control_replicates", "top", "ranking", "run"} <= set(written)
    assert written["n_candidates"] == 13 and len(written["top"]) == 3 and len(written["ranking"]) == 13
    assert written["control_replicates"] == 2 and written["control_records"] == [8, 8]
    top = written["top"][0]
    assert {"rank", "category", "candidate", "delta_p", "delta_logit", "delta_logit_ci_low", "delta_logit_ci_high",
            "t", "p_value", "z", "p_null", "vs_base", "flagged"} <= set(top)
    assert [r["z"] for r in written["top"]] == sorted((r["z"] for r in written["top"]), reverse=True)
    assert len(ps.format_top(res)) == 3
    # Resuming reuses every finished step.
    again = ps.scan(cfg, progress=False)
    assert again["ranking"] == res["ranking"]
    steps = json.loads((tmp_path / "runs" / "tiny" / "manifest.json").read_text())["steps"]
    assert steps and all(s["status"] == "already complete" for s in steps.values())


def test_control_replicates_of_a_file_are_seeded_resamples():
    rows = [{"id": str(i)} for i in range(10)]
    reps = ps.resamples(rows, 3, seed=0)
    assert reps[0] == rows and len(reps) == 3 and all(len(r) == 10 for r in reps)
    assert reps[1] != rows and reps == ps.resamples(rows, 3, seed=0)  # drawn with replacement, the same each run


def test_eval_seeds_of_clean_sets_must_differ_from_the_controls_and_planted_sets():
    from pydantic import ValidationError

    from cai.experiments import poison_eval as pe

    assert pe.control_seeds(pe.ScanEvalConfig(seed=3, control_replicates=3)) == [103, 104, 105]
    for clash in ([3], [103]):
        with pytest.raises(ValidationError, match="clean_seeds"):
            pe.ScanEvalConfig(seed=3, clean_seeds=clash)


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
    assert [s["dataset"] for s in res["skipped"]] == ["data-control-numbers-r0", "data-control-numbers-r1"]
    planted = res["scans"][0]
    assert planted["trait"] == "animal: owl" and 1 <= planted["rank"] <= 32 and planted["records"] == 6
    assert res["summary"]["plain"]["recall_at_1"]["n"] == 1
    assert res["summary"]["clean"]["false_positive_rate"]["n"] == 1
    assert res["n_candidates"] == 32 and res["threshold_p"] == pytest.approx(0.05 / 32)
    assert (tmp_path / "runs" / "ev" / "summary.md").read_text().count("| chat-animal-owl | plain |") == 1
