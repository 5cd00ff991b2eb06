"""cai.training.common and cai.training.curves: TRL defaults per machine, checkpoint lookup, merged save, loading."""

from __future__ import annotations

import csv

import pytest

from cai.errors import UserError
from cai.training.common import last_checkpoint, load_trainable, save_merged, trl_args
from cai.training.curves import append_rows


def _machine(monkeypatch, cuda: bool, bf16: bool = False):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_trl_args_on_cpu(monkeypatch, tmp_path):
    _machine(monkeypatch, cuda=False)
    assert trl_args(tmp_path / "ck", seed=7, progress=False) == {
        "output_dir": str(tmp_path / "ck"), "seed": 7, "logging_steps": 1, "report_to": [], "disable_tqdm": True,
        "use_cpu": True, "bf16": False, "activation_checkpointing": False, "gradient_checkpointing": False}


def test_trl_args_on_gpus(monkeypatch, tmp_path):
    _machine(monkeypatch, cuda=True, bf16=True)
    assert trl_args(tmp_path, seed=0, progress=True) == {
        "output_dir": str(tmp_path), "seed": 0, "logging_steps": 1, "report_to": [], "disable_tqdm": False,
        "use_cpu": False, "bf16": True, "activation_checkpointing": True, "gradient_checkpointing": True}
    assert trl_args(tmp_path, seed=0, progress=True, checkpointing=False)["gradient_checkpointing"] is False
    _machine(monkeypatch, cuda=True, bf16=False)  # e.g. a V100: fp32, never TRL's bf16 default
    assert trl_args(tmp_path, seed=0, progress=True)["bf16"] is False


def test_trl_args_override_trls_cpu_defaults(monkeypatch, tmp_path):
    from trl import DPOConfig

    _machine(monkeypatch, cuda=False)
    default = DPOConfig(output_dir=str(tmp_path), use_cpu=True)
    assert default.bf16 is True and default.gradient_checkpointing is True and default.logging_steps == 10
    ours = DPOConfig(**trl_args(tmp_path, seed=3, progress=False))
    assert (ours.bf16, ours.gradient_checkpointing, ours.activation_checkpointing, ours.logging_steps) == (
        False, False, False, 1)
    assert ours.use_cpu is True and ours.seed == 3 and ours.report_to == []


def test_last_checkpoint_is_the_highest_step(tmp_path):
    assert last_checkpoint(tmp_path / "missing") is None
    assert last_checkpoint(tmp_path) is None
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-9", "runs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a checkpoint folder")
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")


def test_load_trainable_seeds_the_new_reward_head(tiny_path):
    import torch

    heads = [load_trainable(tiny_path, seed=s, head="reward")[0].score.weight for s in (0, 0, 1)]
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])
    model, tok = load_trainable(tiny_path, seed=0, head="reward")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    policy, _ = load_trainable(tiny_path, seed=0)
    assert policy.dtype == torch.float32 and policy.device.type == "cpu"


def test_load_trainable_refuses_served_models():
    with pytest.raises(UserError, match="served over HTTP"):
        load_trainable("openai:m@http://127.0.0.1:9/v1", seed=0)


def test_save_merged_merges_the_adapter_and_replaces_the_folder(tiny_path, tmp_path):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from cai.training.common import lora_config
    from cai.training.sft import SFTTrainConfig

    model, tok = load_trainable(tiny_path, seed=0)
    names = sorted(model.state_dict())
    peft = get_peft_model(model, lora_config(SFTTrainConfig(), target_modules=["q_proj"]))
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("from a killed run")
    (tmp_path / "model.tmp").mkdir()
    save_merged(peft, tok, out, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file() and not (tmp_path / "model.tmp").exists()
    assert not (out / "stale.txt").exists() and not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert sorted(merged.state_dict()) == names


def test_append_rows_writes_the_header_once(tmp_path):
    path = tmp_path / "steps.csv"
    append_rows(path, ["step", "loss"], [[1, 0.5]])
    append_rows(path, ["step", "loss"], [[2, 0.25], [3, ""]])
    with open(path, encoding="utf-8") as f:
        assert list(csv.reader(f)) == [["step", "loss"], ["1", "0.5"], ["2", "0.25"], ["3", ""]]
