"""SL-CAI stages on the tiny model: classification, critique→revision, SFT, resume after a kill, bad input."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from cai.config import load_config
from cai.errors import UserError
from cai.pipeline import run_pipeline
from cai.runs import RunDir, read_jsonl
from cai import classify, critique
from cai.stages.artifacts import sl_model_spec

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, *extra: str, stages="[prompts, classify, critique, sft]"):
    sets = [f"runs_dir={tmp_path}", "models.policy=tiny-random", "models.batch_size=8", "prompts.limit=6",
            "benign.source=benign", "benign.limit=4", "generation.max_new_tokens=8", "critique.few_shot=1",
            "critique.critique_max_new_tokens=6", "critique.helpful_ratio=0.5", "sft.max_steps=1",
            "sft.save_steps=1", f"stages={stages}", *extra]
    return load_config(None, sets)


class _FakeScorer:
    """logprobs: the label named in the request scores -1, others -5, except 'beta', generically likely (-2)."""

    spec = "fake"

    def logprobs(self, prefixes, continuations):
        out = []
        for p, conts in zip(prefixes, continuations):
            req = p[0]["content"].split("Request: ")[1]
            out.append([-1.0 if c.strip() in req else (-2.0 if c.strip() == "beta" else -5.0) for c in conts])
        return out


def test_classification_probabilities_and_calibration():
    labels = ["alpha", "beta", "gamma"]
    raw = classify.classify_prompts(_FakeScorer(), ["about alpha", "nothing"], labels, calibrate=False)
    cal = classify.classify_prompts(_FakeScorer(), ["about alpha", "nothing"], labels, calibrate=True)
    for row in raw + cal:
        assert sum(row) == pytest.approx(1.0)
    assert max(range(3), key=raw[0].__getitem__) == 0
    assert max(range(3), key=raw[1].__getitem__) == 1  # uncalibrated: the generically likely label wins
    assert max(range(3), key=cal[0].__getitem__) == 0
    assert cal[1] == pytest.approx([1 / 3] * 3)  # calibrated: a content-free-looking prompt has no preference


def test_demonstration_turns_and_cleaning():
    from cai.constitution import load_constitution

    c = load_constitution("harmless")
    turns = critique.demonstration_turns(c, 2)
    assert len(turns) == 12 and [t["role"] for t in turns[:6]] == ["user", "assistant"] * 3
    assert turns[2]["content"] == c.principle(c.demonstrations[0].principle).critique
    assert len(critique.demonstration_turns(c, None)) == 6 * len(c.demonstrations)
    assert critique.clean("  Revision: Revised response: Fine.") == "Fine."


def test_principle_sampling_is_weighted_and_deterministic():
    w = {"a": 0.9, "b": 0.1}
    draws = [critique.sample_principle(w, 0, f"id{i}", 1) for i in range(400)]
    assert draws == [critique.sample_principle(w, 0, f"id{i}", 1) for i in range(400)]
    assert 300 < Counter(draws)["a"] < 395


def test_sl_pipeline_on_tiny_model(tiny_path, tmp_path):
    cfg = _config(tmp_path)
    out = run_pipeline(cfg, progress=False)
    run = RunDir(tmp_path / cfg.name)
    cls = read_jsonl(run.root / "classify" / "data.jsonl")
    assert len(cls) == 6 and all(len(r["principles"]) == 3 for r in cls)
    assert all(r["principles"][0]["p"] >= r["principles"][1]["p"] for r in cls)
    assert sum(run.stage("classify").manifest["counts"]["top1_by_principle"].values()) == 6

    data = read_jsonl(run.root / "critique" / "data.jsonl")
    assert len(data) == 6
    for it in data:
        assert set(it) >= {"id", "prompt", "initial", "rounds", "final", "changed", "messages"}
        assert len(it["rounds"]) == 1 and it["rounds"][0]["principle"]
        assert it["messages"][-1] == {"role": "assistant", "content": it["final"]}
    rows = list(csv.DictReader(open(run.root / "critique" / "data.csv", encoding="utf-8")))
    assert [r["id"] for r in rows] == [it["id"] for it in data]
    sft = read_jsonl(run.root / "critique" / "sft.jsonl")
    assert Counter(r["source"] for r in sft) == {"revision": 6, "helpful": 3}
    assert all(r["id"].startswith("helpful:bn-") for r in sft if r["source"] == "helpful")
    man = run.stage("critique").manifest
    assert man["counts"]["principles_from"] == "classify" and len(man["samples"]) == 3
    assert 0 <= man["counts"]["unchanged_rate"] <= 1 and out["critique"]["items"] == 6

    assert (run.root / "sft" / "adapter" / "adapter_config.json").is_file()
    assert sl_model_spec(run, cfg) == str(run.root / "sft" / "merged")
    assert sl_model_spec(RunDir(tmp_path / "other"), cfg) == "tiny-random"
    # a complete run is not redone
    assert run_pipeline(cfg, progress=False)["critique"]["status"] == "already complete"


def test_critique_resumes_after_a_kill_without_duplicates(tiny_path, tmp_path, monkeypatch):
    from cai.backends.hf import HFBackend

    cfg = _config(tmp_path, "critique.rounds=2", "critique.helpful_ratio=0", stages="[prompts, critique]")
    monkeypatch.setattr(critique, "CHUNK", 2)
    real = HFBackend.generate
    calls = {"n": 0}

    def dies(self, chats, sampling, **kw):
        calls["n"] += 1
        if calls["n"] == 8:  # 3 chunks of initial answers, 3 of critiques, then the 2nd chunk of revisions
            raise KeyboardInterrupt
        return real(self, chats, sampling, **kw)

    monkeypatch.setattr(HFBackend, "generate", dies)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, progress=False)
    stage = tmp_path / cfg.name / "critique"
    before = read_jsonl(stage / "steps.jsonl")
    assert len(before) == 6 + 6 + 2 and not (stage / "data.jsonl").exists()
    run_pipeline(cfg, progress=False)
    steps = [r["id"] for r in read_jsonl(stage / "steps.jsonl")]
    assert len(steps) == len(set(steps)) == 6 * 5  # initial + 2 × (critique, revision)
    assert [r["id"] for r in before] == steps[: len(before)]  # finished work was kept, not redone
    data = read_jsonl(stage / "data.jsonl")
    assert len(data) == 6 and all(len(it["rounds"]) == 2 for it in data)
    assert json.loads((stage / "manifest.json").read_text())["attempts"] == 2


def test_without_classify_principles_come_from_categories(tiny_path, tmp_path):
    cfg = _config(tmp_path, "critique.helpful_ratio=0", "prompts.limit=2", stages="[prompts, critique]")
    run_pipeline(cfg, progress=False)
    run = RunDir(tmp_path / cfg.name)
    assert run.stage("critique").manifest["counts"]["principles_from"] == "prompt categories"
    from cai.constitution import load_constitution

    c = load_constitution("harmless")
    for it in read_jsonl(run.root / "critique" / "data.jsonl"):
        assert it["category"] in c.principle(it["rounds"][0]["principle"]).categories


@pytest.mark.parametrize("extra, match", [
    (["critique.principles=[nonexistent]"], "critique.principles: unknown principle 'nonexistent'"),
    (["critique.principles=[care]", "prompts.limit=2"], "no prompt in 'redteam' probes principle 'care'"),
    (["constitution=no_such_constitution"], "config field 'constitution'"),
])
def test_bad_config_is_a_one_line_user_error(tiny_path, tmp_path, extra, match):
    cfg = _config(tmp_path, *extra, stages="[prompts, critique]")
    with pytest.raises(UserError, match=match) as exc:
        run_pipeline(cfg, progress=False)
    assert "\n" not in str(exc.value)


def test_quickstart_config_and_inverted_run_name():
    from cai.commands.run import _default_name

    q = ROOT / "configs" / "quickstart.yaml"
    cfg = load_config(q, ["constitution=inverted"])
    assert cfg.stages[:4] == ["prompts", "classify", "critique", "sft"] and cfg.sft.loss_on == "assistant"
    assert _default_name(q, "inverted") == "quickstart-inverted"
    assert load_config(ROOT / "configs" / "feedback-openai.yaml").models.feedback.startswith("openai:")


@pytest.mark.smoke
def test_real_model_critique_round(real_backend, tmp_path, monkeypatch):
    """The 135M model as its own critic: the loop runs and every revision is text (quality is not asserted)."""
    cfg = load_config(None, [f"runs_dir={tmp_path}", "prompts.limit=2", "critique.helpful_ratio=0",
                             "critique.few_shot=1", "generation.max_new_tokens=32",
                             "critique.critique_max_new_tokens=24", "stages=[prompts, classify, critique]"])
    from cai.stages import ModelPool

    monkeypatch.setattr(ModelPool, "get", lambda self, spec: real_backend)
    monkeypatch.setattr(ModelPool, "release", lambda self: None)  # the session fixture stays loaded
    run_pipeline(cfg, progress=False)
    data = read_jsonl(tmp_path / cfg.name / "critique" / "data.jsonl")
    assert len(data) == 2 and all(it["final"].strip() and it["rounds"][0]["critique"].strip() for it in data)
