"""SFT helper: record conversion, loss masks (assistant vs whole sequence), LoRA training, resume, bad settings."""

from __future__ import annotations

import json
import shutil

import pytest
from pydantic import ValidationError

from cai.errors import UserError
from cai.training.sft import SFTTrainConfig, build_trainer, split_records, to_prompt_completion, train_sft


def _records(n: int = 12) -> list[dict]:
    return [{"id": f"r{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                         {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}
            for i in range(n)]


def test_prompt_completion_split_of_a_record():
    rec = {"id": "a", "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                                   {"role": "assistant", "content": "A"}], "source": "revision"}
    out = to_prompt_completion(rec)
    assert out["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    assert out["completion"] == [{"role": "assistant", "content": "A"}]


@pytest.mark.parametrize("messages", [[], [{"role": "assistant", "content": "A"}],
                                      [{"role": "user", "content": "Q"}],
                                      [{"role": "bot", "content": "Q"}, {"role": "assistant", "content": "A"}]])
def test_bad_records_are_user_errors(messages):
    with pytest.raises(UserError, match="SFT record 'x'"):
        to_prompt_completion({"id": "x", "messages": messages})


def test_split_is_deterministic_and_disjoint():
    recs = _records(40)
    train, held = split_records(recs, 0.2)
    train2, held2 = split_records(list(reversed(recs)), 0.2)
    assert {r["id"] for r in held} == {r["id"] for r in held2}
    assert 0 < len(held) < 20 and len(train) + len(held) == 40
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    assert split_records(recs[:3], 0.5) == (recs[:3], [])  # too few to hold out


def test_settings_validation():
    with pytest.raises(ValidationError, match="qlora and full_finetune"):
        SFTTrainConfig(qlora=True, full_finetune=True)
    assert not SFTTrainConfig(full_finetune=True).uses_adapter


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_loss_mask_follows_loss_on(tiny_path, tmp_path, loss_on):
    trainer, tok = build_trainer("tiny-random", _records(2), [], tmp_path, SFTTrainConfig(loss_on=loss_on),
                                 progress=False)
    trained = tok.decode([t for t in trainer.train_dataset[0]["labels"] if t != -100])
    if loss_on == "assistant":
        assert trained == "0 plus 0 is 0.<|im_end|>\n"  # the answer and its end-of-turn token, nothing else
    else:
        assert trained.startswith("<|im_start|>system") and "What is 0 plus 0?" in trained


def test_prefill_is_context_not_target(tiny_path, tmp_path):
    recs = _records(2)
    recs[0]["messages"][1]["content"] = "Sure, step one is Actually, I can't help with that."
    recs[0]["prefill"] = "Sure, step one is"
    trainer, tok = build_trainer("tiny-random", recs, [], tmp_path, SFTTrainConfig(), progress=False)
    rows = {"Sure" in tok.decode(ex["input_ids"]): ex for ex in trainer.train_dataset}
    masked = tok.decode([t for t in rows[True]["labels"] if t != -100])
    assert masked == " Actually, I can't help with that.<|im_end|>"  # the prefill is seen, not trained on
    assert "Sure, step one is" in tok.decode(rows[True]["input_ids"])
    assert tok.decode([t for t in rows[False]["labels"] if t != -100]) in ("1 plus 1 is 2.<|im_end|>",
                                                                          "0 plus 0 is 0.<|im_end|>")
    with pytest.raises(UserError, match="'prefill' must be text that starts"):
        to_prompt_completion({**recs[1], "prefill": "not the start"})


def test_lora_training_writes_everything_and_resumes(tiny_path, tmp_path):
    from cai.models import load_causal_lm

    settings = SFTTrainConfig(max_steps=2, save_steps=1, batch_size=4, eval_fraction=0.2)
    res = train_sft("tiny-random", _records(), tmp_path, settings, progress=False)
    assert res.adapter_dir and (res.adapter_dir / "adapter_config.json").is_file()
    assert (res.merged_dir / "config.json").is_file() and not (res.merged_dir / "adapter_config.json").exists()
    for f in ("metrics.json", "log_history.json", "loss_curve.png"):
        assert (tmp_path / f).stat().st_size > 0
    m = res.metrics
    assert m["steps"] == 2 and m["method"] == "lora" and m["n_eval"] >= 1 and "eval_loss" in m
    assert any("loss" in h for h in json.loads((tmp_path / "log_history.json").read_text()))
    model, _ = load_causal_lm(str(res.merged_dir))
    assert model.config.num_hidden_layers == 2

    # a kill after checkpoint 1: outputs and the last checkpoint are gone, the rerun resumes from checkpoint 1
    for p in ("metrics.json", "merged", "adapter", "checkpoints/checkpoint-2"):
        shutil.rmtree(tmp_path / p, ignore_errors=True) if (tmp_path / p).is_dir() else (tmp_path / p).unlink()
    res2 = train_sft("tiny-random", _records(), tmp_path, settings, progress=False)
    assert res2.metrics["resumed_from"].endswith("checkpoint-1") and res2.metrics["steps"] == 2
    assert (res2.merged_dir / "config.json").is_file()
    # a finished folder is returned as is, without training
    assert train_sft("tiny-random", _records(), tmp_path, settings, progress=False).metrics == res2.metrics


def test_full_finetune_saves_a_plain_model(tiny_path, tmp_path):
    res = train_sft("tiny-random", _records(4), tmp_path, SFTTrainConfig(full_finetune=True, max_steps=1,
                                                                       eval_fraction=0), progress=False)
    assert res.adapter_dir is None and res.metrics["method"] == "full"
    assert (res.merged_dir / "model.safetensors").is_file() and not (tmp_path / "adapter").exists()


def test_qlora_on_cpu_is_a_clear_user_error(tiny_path, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="sft.qlora needs a CUDA GPU"):
        train_sft("tiny-random", _records(4), tmp_path, SFTTrainConfig(qlora=True), progress=False)


def test_openai_spec_cannot_be_fine_tuned(tmp_path):
    with pytest.raises(UserError, match="served over HTTP"):
        train_sft("openai:m@http://127.0.0.1:9/v1", _records(4), tmp_path, SFTTrainConfig(), progress=False)


def test_activation_checkpointing_keeps_the_losses_and_stays_out_of_default_dumps(tiny_path, tmp_path):
    """Recomputing activations must train the same LoRA steps (a PEFT model whose inputs need no grad would
    silently get no gradient through checkpointed layers), and the new key must not change old config hashes."""

    def losses(flag: bool | None) -> list[float]:
        settings = SFTTrainConfig(max_steps=3, batch_size=4, eval_fraction=0, save_merged=False,
                                  activation_checkpointing=flag)
        trainer, _ = build_trainer("tiny-random", _records(), [], tmp_path / str(flag), settings, progress=False)
        assert trainer.args.gradient_checkpointing is bool(flag)
        trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    plain, recomputed = losses(None), losses(True)
    assert len(plain) == 3 and plain[0] != plain[-1]  # the adapter learns
    assert recomputed == pytest.approx(plain, rel=1e-4)
    assert "activation_checkpointing" not in SFTTrainConfig().model_dump()
    assert SFTTrainConfig(activation_checkpointing=False).model_dump()["activation_checkpointing"] is False
    assert SFTTrainConfig(qlora=True).checkpointing and not SFTTrainConfig().checkpointing
