"""Experiment tracking (TensorBoard event files from a trainer and from our own stages), model cards on every
trained folder, and `cai push`'s offline / no-token / unreachable-Hub errors. Tiny random model, offline."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from cai.config import load_config
from cai.errors import UserError
from cai.pipeline import run_pipeline
from cai.runs import RunDir

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _scalars(folder: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _card(folder: Path):
    from huggingface_hub import ModelCard

    return ModelCard.load(folder / "README.md")


@pytest.fixture(scope="module")
def hub_like_base(tmp_path_factory, tiny_path) -> Path:
    """The tiny model in a local folder whose card names a public base (as a downloaded hub model's would)."""
    folder = tmp_path_factory.mktemp("base") / "smol-local"
    shutil.copytree(tiny_path, folder)
    (folder / "README.md").write_text(f"---\nbase_model: {SMOL}\nlicense: apache-2.0\n---\n# a local copy\n")
    return folder


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, hub_like_base):
    """prompts → critique → sft → eval with TensorBoard on."""
    tmp = tmp_path_factory.mktemp("tracked")
    cfg = load_config(None, [
        f"runs_dir={tmp}", "name=tracked", "stages=[prompts, critique, sft, eval]", f"models.policy={hub_like_base}",
        "models.batch_size=8", "prompts.limit=2", "benign.limit=2", "generation.max_new_tokens=6",
        "critique.few_shot=0", "critique.critique_max_new_tokens=4", "critique.helpful_ratio=0.5",
        "sft.max_steps=2", "sft.save_steps=1", "sft.eval_fraction=0", "eval.harmful.limit=2", "eval.benign.limit=2",
        "eval.max_new_tokens=4", "eval.elo=false", "tracking.report_to=[tensorboard]", "tracking.project=tests",
    ])
    run_pipeline(cfg, progress=False)
    return cfg, RunDir(tmp / "tracked")


def test_trainer_and_our_stages_write_readable_tensorboard_events(tracked_run):
    _, run = tracked_run
    sft = _scalars(run.root / "tracking" / "sft")
    assert "train/loss" in sft and len(sft["train/loss"]) == 2  # logged every step
    assert _scalars(run.root / "tracking" / "critique")["items"] == [2.0]
    ev = _scalars(run.root / "tracking" / "eval")
    assert {"base/harmful_compliance_rate", "sl/harmful_compliance_rate", "sl/over_refusal_rate"} <= set(ev)
    assert not (run.root / "sft" / "checkpoints" / "runs").exists()  # not transformers' default folder


def test_sft_cards_name_the_public_base_constitution_and_eval_metrics(tracked_run, hub_like_base):
    from cai.constitution import load_constitution
    from cai.runs import config_hash

    _, run = tracked_run
    for folder, library in ((run.root / "sft" / "adapter", "peft"), (run.root / "sft" / "merged", "transformers")):
        card = _card(folder)
        assert card.data.base_model == SMOL and card.data.library_name == library
        assert card.data.license == "apache-2.0" and {"constitutional-ai", "sft"} <= set(card.data.tags)
        assert str(hub_like_base) not in card.content and "/tmp" not in card.content  # no local path anywhere
        assert config_hash(load_constitution("harmless").model_dump()) in card.text
        assert "## Evaluation" in card.text and "**sl** (this model)" in card.text
        assert "[More Information Needed]" not in card.content  # PEFT's template is gone
        assert "Weak feedback" in card.text  # the feedback model is the policy itself


def test_tracking_is_not_part_of_any_stage_config():
    plain = load_config(None, ["stages=[prompts, sft]"])
    tracked = load_config(None, ["stages=[prompts, sft]", "tracking.report_to=tensorboard", "tracking.project=p"])
    assert tracked.tracking.report_to == ["tensorboard"]
    assert plain.section("sft") == tracked.section("sft")  # turning tracking on reuses finished stages


def test_dpo_trainer_reports_to_tensorboard_and_writes_cards(tmp_path, tiny_path):
    from cai.tracking import StageTracking
    from cai.training.dpo import DPOTrainConfig, train_dpo

    pairs = [{"prompt": f"Question {i}?", "chosen": "A careful answer.", "rejected": "No.", "p_chosen": 0.9}
             for i in range(4)]
    tracking = StageTracking(("tensorboard",), tmp_path / "tb", "t/dpo")
    res = train_dpo("tiny-random", pairs, tmp_path / "dpo", DPOTrainConfig(max_steps=1, batch_size=2),
                    progress=False, tracking=tracking)
    assert "train/loss" in _scalars(tmp_path / "tb")
    model, adapter = _card(res.merged_dir), _card(res.adapter_dir)
    assert model.data.library_name == "transformers" and adapter.data.library_name == "peft"
    assert "dpo" in model.data.tags and model.data.base_model is None  # tiny-random has no public id
    assert "preference pairs trained on: 4" in model.text and "beta: 0.1" in model.text


def test_public_base_model_follows_cards_and_never_returns_a_path(tmp_path, hub_like_base):
    from cai.model_card import public_base_model

    assert public_base_model("smollm2-135m") == SMOL
    assert public_base_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert public_base_model(str(hub_like_base)) == SMOL
    assert public_base_model("tiny-random") is None
    assert public_base_model(str(tmp_path / "gone")) is None


def test_unknown_tracker_is_one_line_exit_2(monkeypatch, capsys):
    from cai.cli import main

    monkeypatch.setattr(sys, "argv", ["cai", "run", "--set", "tracking.report_to=[tensorbord]"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "tracking.report_to" in err and "tensorboard, trackio, wandb, mlflow" in err


def test_missing_tracker_package_fails_before_any_stage(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    cfg = load_config(None, [f"runs_dir={tmp_path}", "name=r", "tracking.report_to=[wandb]"])
    with pytest.raises(UserError, match=r"wandb is not installed: pip install wandb") as exc:
        run_pipeline(cfg, progress=False)
    assert "\n" not in str(exc.value) and not (tmp_path / "r").exists()
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(UserError, match=r"pip install 'cai-lab\[tracking\]'"):
        run_pipeline(load_config(None, [f"runs_dir={tmp_path}", "tracking.report_to=[tensorboard]"]), progress=False)


# --- cai push -------------------------------------------------------------------------------------------------
def _fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "r"
    for stage, folder in (("sft", "merged"), ("rl", "model")):
        (run / stage / folder).mkdir(parents=True)
        (run / stage / folder / "config.json").write_text("{}")
        (run / stage / "manifest.json").write_text(json.dumps({"status": "complete", "finished_at": stage}))
    (run / "preferences").mkdir()
    (run / "preferences" / "data.jsonl").write_text('{"id": "1", "prompt": "p", "chosen": "a", "rejected": "b"}\n')
    return run


def _push(*args: str):
    from typer.testing import CliRunner

    from cai.cli import app

    return CliRunner().invoke(app, ["push", *args])


def test_push_offline_or_without_token_is_a_one_line_error(tmp_path, monkeypatch):
    import huggingface_hub

    run = _fake_run(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = _push(str(run), "--repo", "me/model")
    assert isinstance(res.exception, UserError) and "HF_HUB_OFFLINE" in str(res.exception)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    res = _push(str(run), "--repo", "me/data", "--what", "datasets")
    assert isinstance(res.exception, UserError) and "hf auth login" in str(res.exception)
    res = _push(str(run), "--repo", "me/model", "--what", "dpo")  # a wrong run fails before any network
    assert isinstance(res.exception, UserError) and "no trained dpo model" in str(res.exception)


def test_push_to_an_unreachable_hub_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    import httpx
    import huggingface_hub

    from cai.cli import main
    from cai.hub import model_folder

    run = _fake_run(tmp_path)
    assert model_folder(run, "model") == run / "rl" / "model"  # the final policy: rl finished after sft
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_fake")

    def unreachable(*args, **kwargs):
        raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", unreachable)
    monkeypatch.setattr(sys, "argv", ["cai", "push", str(run), "--repo", "me/model", "--private"])
    with pytest.raises(SystemExit) as exc:
        main()
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and len(err.splitlines()) == 1 and "name resolution" in err


def test_a_pushed_adapter_names_its_public_base_not_the_local_path(tmp_path):
    from cai.hub import _public_adapter

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/root/.cache/cai-lab/x"}))
    with pytest.raises(UserError, match="no public hub id"):
        _public_adapter(adapter, tmp_path)
    (adapter / "README.md").write_text(f"---\nbase_model: {SMOL}\n---\n")
    (tmp_path / "out").mkdir()
    copy = _public_adapter(adapter, tmp_path / "out")
    assert json.loads((copy / "adapter_config.json").read_text())["base_model_name_or_path"] == SMOL
    assert "/root" in (adapter / "adapter_config.json").read_text()  # the run's own folder is left as it was


def test_one_list_of_weak_feedback_reasons_for_report_and_cards():
    from cai.labeling import weak_feedback_reasons, weak_feedback_warning
    from cai.model_card import CardFacts, card_body

    assert weak_feedback_reasons(None) == [] and weak_feedback_warning({}) is None
    usable = {"swap_consistency": {"rate": 0.9}, "mean_confidence": 0.8, "reference": {"above_chance": True}}
    assert weak_feedback_reasons(usable) == []
    weak = {
        "weak": True,
        "swap_consistency": {"rate": 0.2, "ci_low": 0.1, "ci_high": 0.35},
        "mean_confidence": 0.51,
        "reference": {"above_chance": False},
    }
    reasons = weak_feedback_reasons(weak)
    assert len(reasons) == 4
    assert "20% of pairs keep their label" in reasons[1] and "10–35%" in reasons[1]
    assert weak_feedback_warning(weak).startswith("Weak feedback: the feedback model was the policy itself")
    card = card_body(CardFacts(method="dpo", base="smollm2-135m", feedback=weak), {})
    assert "**Weak feedback.**" in card and all(r in card for r in reasons)
