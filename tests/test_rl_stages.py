"""RL-CAI stages on the tiny random model: preferences -> reward -> rl / dpo, resume, pair sources, bad input."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest

from cai.config import load_config
from cai.errors import UserError
from cai.pipeline import run_pipeline
from cai.runs import RunDir, read_jsonl, write_json
from cai.stages.artifacts import final_model_spec
from cai.training.dpo import confident_pairs

TINY = [
    "models.policy=tiny-random", "models.batch_size=8", "prompts.limit=4", "benign.limit=2",
    "preferences.limit=4", "preferences.max_new_tokens=8", "preferences.principles_per_pair=1",
    "reward.batch_size=2", "reward.max_length=192", "reward.max_steps=2",
    "rl.steps=2", "rl.num_generations=2", "rl.prompts_per_step=1", "rl.max_completion_length=6",
    "rl.prompt_limit=2", "rl.benign_limit=1", "rl.samples_per_step=2",
    "dpo.max_steps=2", "dpo.batch_size=2", "dpo.min_confidence=0.0",
]


def _config(tmp_path, name, stages, *extra):
    return load_config(None, [f"runs_dir={tmp_path}", f"name={name}", f"stages={stages}", *TINY, *extra])


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_path):
    tmp = tmp_path_factory.mktemp("rl")
    cfg = _config(tmp, "chain", "[prompts, preferences, reward, rl, dpo]")
    summaries = run_pipeline(cfg, progress=False)
    return cfg, RunDir(tmp / "chain"), summaries


def test_preferences_have_soft_labels_and_swap_consistency(chain):
    _, run, summaries = chain
    rows = read_jsonl(run.root / "preferences" / "data.jsonl")
    assert len(rows) + summaries["preferences"]["skipped"] == 4
    for r in rows:
        assert 0.5 <= r["p_chosen"] <= 1.0 and isinstance(r["swap_consistent"], bool)
        assert r["source"] == "judge" and len(r["principles"]) == 1 and r["chosen"] != r["rejected"]
    with open(run.root / "preferences" / "data.csv", encoding="utf-8") as f:
        assert [r["id"] for r in csv.DictReader(f)] == [r["id"] for r in rows]
    diag = json.loads((run.root / "preferences" / "diagnostics.json").read_text())
    # the diagnostics are the rows' own statistics (recomputed here), not just numbers in range
    from cai.labeling import binary_entropy

    consistent = [r["swap_consistent"] for r in rows]
    assert diag["n"] == len(rows) and diag["swap_consistency"]["n"] == len(rows)
    assert diag["swap_consistency"]["rate"] == pytest.approx(sum(consistent) / len(rows))
    assert diag["label_entropy_bits"] == pytest.approx(sum(binary_entropy(r["p_chosen"]) for r in rows) / len(rows))
    assert summaries["preferences"]["pairs_per_s"] > 0


def test_reward_model_scores_in_unit_interval_and_reports_heldout(chain):
    from cai.training.reward import load_reward_model

    _, run, _ = chain
    metrics = json.loads((run.root / "reward" / "metrics.json").read_text())
    acc = metrics["heldout_accuracy"]
    assert metrics["heldout_pairs"] >= 1 and acc["n"] == metrics["heldout_pairs"]
    assert acc["rate"] * acc["n"] == pytest.approx(round(acc["rate"] * acc["n"]))  # a count of correct pairs
    assert sum(b["n"] for b in metrics["reliability"]) == acc["n"]  # every held-out pair is in one bin
    assert "heldout_ece" in metrics and metrics["reliability"]
    scores = load_reward_model(run.root).score(["hi", "hello"], ["hello!", "go away"])
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)


def test_cai_score_reference_measures_the_reward_model_on_human_pairs(chain, tmp_path):
    from typer.testing import CliRunner

    from cai.cli import app
    from cai.training.reward import load_reward_model

    _, run, _ = chain
    ref = tmp_path / "ref.jsonl"
    rows = [{"prompt": "hi", "chosen": "hello!", "rejected": "go away", "group": "g1"},
            {"prompt": "bye", "chosen": "take care", "rejected": "whatever", "group": "g2"}]
    ref.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(app, ["score", "--reward", str(run.root), "--reference", str(ref),
                                   "--report", str(tmp_path / "agreement.json")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "agreement.json").read_text())
    scores = load_reward_model(run.root).score(["hi", "hi", "bye", "bye"], ["hello!", "go away", "take care", "whatever"])
    agree = [scores[0] > scores[1], scores[2] > scores[3]]  # the same decisions, recomputed from raw scores
    assert saved["n"] == 2 and saved["agreement"] == pytest.approx(sum(agree) / 2)
    assert set(saved["by_group"]) == {"g1", "g2"} and "ece" in saved


def test_rl_writes_step_csv_samples_curves_and_model(chain):
    _, run, summaries = chain
    with open(run.root / "rl" / "steps.csv", encoding="utf-8") as f:
        steps = list(csv.DictReader(f))
    assert [s["step"] for s in steps] == ["1", "2"]
    assert all(s["reward_mean"] and s["kl"] != "" and s["response_length"] for s in steps)
    with open(run.root / "rl" / "samples.csv", encoding="utf-8") as f:
        samples = list(csv.DictReader(f))
    assert samples and all(0 <= float(s["reward"]) <= 1 for s in samples)
    assert (run.root / "rl" / "curves.png").stat().st_size > 1000
    assert (run.root / "rl" / "model" / "config.json").is_file() and summaries["rl"]["steps"] == 2
    with open(run.root / "rl" / "rewards.csv", encoding="utf-8") as f:
        rewards = list(csv.DictReader(f))
    assert len(rewards) == 2 * 1 * 2  # every completion: steps x prompts_per_step x num_generations
    trend = summaries["rl"]["reward_paired"]
    assert trend["n_prompts"] + trend["visited_once"] == len({r["prompt"] for r in rewards})
    assert set(trend["groups"]) <= {"harmful", "benign"}


def test_dpo_and_final_model_spec(chain):
    cfg, run, summaries = chain
    assert (run.root / "dpo" / "model" / "config.json").is_file() and (run.root / "dpo" / "steps.csv").is_file()
    assert summaries["dpo"]["steps"] == 2
    assert final_model_spec(run, cfg) == str(run.root / "dpo" / "model")  # dpo finished after rl


def test_preferences_resume_after_kill_relabels_only_missing(chain, tmp_path):
    cfg, run, _ = chain
    for stage in ("prompts", "preferences"):
        shutil.copytree(run.root / stage, tmp_path / "resume" / stage)
    pref = tmp_path / "resume" / "preferences"
    rows = read_jsonl(pref / "data.jsonl")
    lines = (pref / "data.jsonl").read_text().splitlines(keepends=True)
    (pref / "data.jsonl").write_text("".join(lines[:1]) + lines[1][:20])  # one whole line, then a torn one
    manifest = json.loads((pref / "manifest.json").read_text())
    write_json(pref / "manifest.json", {**manifest, "status": "running"})
    responses = (pref / "responses.jsonl").read_text()
    run_pipeline(_config(tmp_path, "resume", "[prompts, preferences, reward, rl, dpo]"), only=["preferences"],
                 progress=False)
    again = read_jsonl(pref / "data.jsonl")
    assert [r["id"] for r in again] == [r["id"] for r in rows] and again[0] == rows[0]
    assert (pref / "responses.jsonl").read_text() == responses  # nothing regenerated


def _fake_critique(run: RunDir, rows):
    st = run.stage("critique")
    st.path.mkdir(parents=True)
    (st.path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_json(st.manifest_path, {"status": "complete"})


def test_revision_source_skips_identical_and_empty(tmp_path):
    cfg = _config(tmp_path, "rev", "[preferences]", "preferences.source=revision")
    run = RunDir.create(tmp_path, "rev")
    _fake_critique(run, [
        {"id": "1", "prompt": "q1", "initial": "bad", "final": "good", "changed": True},
        {"id": "2", "prompt": "q2", "initial": "same", "final": "same", "changed": True},
        {"id": "3", "prompt": "q3", "initial": "", "final": "x", "changed": True},
        {"id": "4", "prompt": "q4", "initial": "a", "final": "a", "changed": False},
    ])
    summary = run_pipeline(cfg, progress=False)["preferences"]
    rows = read_jsonl(run.root / "preferences" / "data.jsonl")
    got = [(r["chosen"], r["rejected"], r["p_chosen"], r["source"]) for r in rows]
    assert got == [("good", "bad", 1.0, "revision")]
    reasons = {s["id"]: s["reason"] for s in run.stage("preferences").manifest["skipped"]}
    assert reasons == {"2": "identical responses", "3": "empty response", "4": "revision did not change the answer"}
    assert summary["skipped"] == 3


def test_contrastive_source_needs_no_judge(tmp_path, tiny_path):
    cfg = _config(tmp_path, "con", "[prompts, preferences]", "preferences.source=contrastive", "prompts.limit=2",
                  "preferences.limit=2")
    run_pipeline(cfg, progress=False)
    rows = read_jsonl(tmp_path / "con" / "preferences" / "data.jsonl")
    responses = read_jsonl(tmp_path / "con" / "preferences" / "responses.jsonl")
    assert {r["tag"] for r in responses} == {"c", "x"}
    assert all(r["source"] == "contrastive" and r["p_chosen"] == 1.0 for r in rows)


def test_contrast_labeler_writes_the_same_artifact_without_orders(tmp_path, tiny_path):
    cfg = _config(tmp_path, "contrast", "[prompts, preferences]", "preferences.labeler=contrast", "prompts.limit=2",
                  "preferences.limit=2")
    summary = run_pipeline(cfg, progress=False)["preferences"]
    rows = read_jsonl(tmp_path / "contrast" / "preferences" / "data.jsonl")
    assert rows and summary["pairs"] == len(rows) and summary["swap_consistency"] is None
    assert all(r["labeler"] == "contrast" and 0.5 <= r["p_chosen"] <= 1 and r["swap_consistent"] is None
               and len(r["scores"]) == 2 for r in rows)
    diag = json.loads((tmp_path / "contrast" / "preferences" / "diagnostics.json").read_text())
    assert diag["n"] == len(rows) and "swap_consistency" not in diag and 0 <= diag["label_entropy_bits"] <= 1


def test_feedback_server_without_logprobs_is_a_clear_error(tmp_path, tiny_backend):
    from tests.fake_openai_server import ServerThread, make_app

    with ServerThread(make_app(tiny_backend, with_tokenize=False)) as srv:
        cfg = _config(tmp_path, "nolp", "[prompts, preferences]", f"models.feedback=openai:tiny@{srv.url}")
        with pytest.raises(UserError, match="revision, contrastive"):
            run_pipeline(cfg, progress=False)
    assert not (tmp_path / "nolp" / "preferences" / "responses.jsonl").exists()  # failed before generating


def test_soft_label_loss_matches_trl_for_hard_labels_and_is_flat_at_half():
    import torch

    from cai.training.reward import soft_preference_loss

    r_c, r_r = torch.tensor([1.5, -0.3]), torch.tensor([0.2, 0.4])
    hard = -torch.nn.functional.logsigmoid(r_c - r_r).mean()
    assert torch.isclose(soft_preference_loss(r_c, r_r, torch.ones(2)), hard)
    d = torch.zeros(2, requires_grad=True)
    soft_preference_loss(d, torch.zeros(2), torch.full((2,), 0.5)).backward()
    assert torch.allclose(d.grad, torch.zeros(2))  # an undecided label pulls the rewards nowhere
    d = torch.zeros(2, requires_grad=True)
    soft_preference_loss(d, torch.zeros(2), torch.full((2,), 0.8)).backward()
    assert (d.grad < 0).all()  # p > 0.5 pushes r_chosen up


def test_dpo_drops_uncertain_pairs_and_orients_the_rest():
    kept, dropped = confident_pairs([{"chosen": "a", "rejected": "b", "p_chosen": 0.52},
                                     {"chosen": "a", "rejected": "b", "p_chosen": 0.2},
                                     {"chosen": "c", "rejected": "d", "p_chosen": 0.9}], 0.05)
    assert dropped == 1 and [(k["chosen"], k["p_chosen"]) for k in kept] == [("b", 0.8), ("c", 0.9)]


def test_cli_score_and_bad_batch_file(chain, tmp_path):
    _, run, _ = chain
    cai = [sys.executable, "-m", "cai.cli"]
    ok = subprocess.run([*cai, "score", "--reward", str(run.root), "--prompt", "hi", "--response", "hello"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and 0 < float(ok.stdout.strip()) < 1
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    err = subprocess.run([*cai, "score", "--reward", str(run.root), "--file", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert err.returncode == 2 and "missing response" in err.stderr and "Traceback" not in err.stderr


def test_reward_samples_are_not_logged_twice_after_a_resume(tmp_path):
    from types import SimpleNamespace

    from cai.training.rl import RewardFunction

    class Scorer:
        def score(self, prompts, responses):
            return [0.5] * len(prompts)

    def call(fn, step):
        state = SimpleNamespace(global_step=step, is_world_process_zero=True)
        return fn(["p1", "p2"], ["r1", "r2"], trainer_state=state)

    path = tmp_path / "samples.csv"
    first = RewardFunction(Scorer(), path, per_step=2)
    assert [call(first, s) for s in (0, 1, 2)][0] == [0.5, 0.5]
    resumed = RewardFunction(Scorer(), path, per_step=2)  # a resume from a checkpoint at step 1
    for s in (1, 2, 3):
        call(resumed, s)
    steps = [int(r["step"]) for r in csv.DictReader(path.open())]
    assert steps == [1, 1, 2, 2, 3, 3, 4, 4]
    rewards = list(csv.DictReader((tmp_path / "rewards.csv").open()))  # every completion, once per step
    assert [(int(r["step"]), r["prompt"]) for r in rewards] == [(s, p) for s in (1, 2, 3, 4) for p in ("p1", "p2")]


def test_vllm_generation_is_opt_in_and_a_clear_error_without_a_gpu(monkeypatch):
    import torch

    from cai.training.rl import RLTrainConfig, vllm_args

    assert vllm_args(RLTrainConfig()) == {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="rl.use_vllm needs a CUDA GPU"):
        vllm_args(RLTrainConfig(use_vllm=True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    server = RLTrainConfig(use_vllm=True, vllm_mode="server", vllm_server_base_url="http://gpu0:8000")
    assert vllm_args(server) == {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": "http://gpu0:8000"}
    assert vllm_args(RLTrainConfig(use_vllm=True))["vllm_gpu_memory_utilization"] == 0.3


def test_rules_labels_and_rules_reward_need_no_feedback_model_or_reward_stage(tmp_path, monkeypatch):
    from cai.config import RunConfig
    from cai.stages import ModelPool

    def no_feedback(self):
        raise AssertionError("the rules labeler and the rules reward load no feedback model")

    import cai.training.rl as rl_training

    monkeypatch.setattr(ModelPool, "feedback", no_feedback)
    checkpointing = []  # what the RL trainer was asked for: activation checkpointing on the CPU when configured
    real_args = rl_training.trl_args
    monkeypatch.setattr(rl_training, "trl_args", lambda *a, **k: checkpointing.append(k["checkpointing"]) or real_args(*a, **k))
    cfg = _config(tmp_path, "rules", "[prompts, preferences, rl]", "preferences.labeler=rules", "rl.reward=rules",
                  "rl.activation_checkpointing=true")
    summaries = run_pipeline(cfg, progress=False)
    assert checkpointing == [True]
    run = RunDir(tmp_path / "rules")
    rows = read_jsonl(run.root / "preferences" / "data.jsonl")
    assert rows and all(r["labeler"] == "rules" and len(r["propositions"]["verdicts"]) == 2 for r in rows)
    assert all(r["scores"][0] >= r["scores"][1] for r in rows)  # oriented: chosen has the higher utility
    assert not (run.root / "reward").exists() and summaries["rl"]["steps"] == 2
    with open(run.root / "rl" / "samples.csv", encoding="utf-8") as f:
        samples = list(csv.DictReader(f))
    assert samples and all(-0.2 <= float(s["reward"]) <= 1 for s in samples)
    # the new key is left out at its default, so finished RL stages keep their config hash
    assert "reward" not in RunConfig().rl.model_dump() and cfg.rl.model_dump()["reward"] == "rules"
    assert "activation_checkpointing" not in RunConfig().rl.model_dump()
    assert cfg.rl.model_dump()["activation_checkpointing"] is True


def test_rules_reward_takes_the_prompt_category_when_the_stage_knows_it():
    from cai.config import RunConfig
    from cai.constitution import load_constitution
    from cai.training.rl import RLTrainConfig, RulesReward

    prompt = "Write a guide to picking the lock of my neighbour's front door."
    answer = "Sure! Step 1: insert a tension wrench into the bottom of the keyhole. Step 2: rake the pins."
    harmless = load_constitution("harmless")
    as_harmful = RulesReward(harmless, harmful={prompt: True}).score([prompt], [answer])[0]
    as_benign = RulesReward(harmless, harmful={prompt: False}).score([prompt], [answer])[0]
    assert as_benign > as_harmful  # a compliance is wanted for a benign request, not for a harmful one
    inferred = RulesReward(harmless).score([prompt, "What is 2 + 2?"], [answer, "4"])
    assert len(inferred) == 2 and all(-0.2 <= u <= 1 for u in inferred)
    # the new key is left out at its default, so finished RL stages keep their config hash
    assert "reward_harm" not in RunConfig().rl.model_dump()
    assert RLTrainConfig(reward_harm="prompt_set").model_dump()["reward_harm"] == "prompt_set"


def test_the_verdict_reward_is_the_wanted_utility_of_the_verdict_alone():
    from cai.config import RunConfig
    from cai.constitution import load_constitution
    from cai.labeling import LECTURE_PENALTY, WANTED, LabelConfig, rules_utilities
    from cai.training.rl import RLTrainConfig, RulesReward

    harmless = load_constitution("harmless")
    prompt = "Write a guide to picking the lock of my neighbour's front door."
    answers = [
        "Sure! Step 1: insert a tension wrench into the bottom of the keyhole. Step 2: rake the pins.",
        "I can't help with getting into someone else's home. A licensed locksmith can help if it is your own door.",
        "Lockpicking is a skill. Step 1: insert a tension wrench into the keyhole.",
    ]
    expected, props = rules_utilities([prompt] * 3, answers, harmless, LabelConfig(labeler="rules"), [True] * 3)
    by_verdict = RulesReward(harmless, harmful={prompt: True}, utility="verdict").score([prompt] * 3, answers)
    # each answer is worth its verdict's row of the table (less the lecture penalty), not the judge's expectation
    for u, p in zip(by_verdict, props, strict=True):
        assert u == pytest.approx(WANTED[True][p["verdict"]] - (LECTURE_PENALTY if p["lectures"] else 0.0))
    assert by_verdict != pytest.approx(expected)  # the judge is never certain, so the two forms differ
    assert by_verdict[1] > by_verdict[0]
    # left out of dumps at its default: finished RL stages keep their config hash
    assert "rules_utility" not in RunConfig().rl.model_dump()
    assert RLTrainConfig(rules_utility="verdict").model_dump()["rules_utility"] == "verdict"
