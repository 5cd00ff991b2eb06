"""scripts/gpu-check.sh's checks run end to end on the CPU fallback with tiny-random (the GPU run itself needs a
CUDA machine: docs/performance.md), write one JSON naming device and precision, and record a failing check
without stopping the others."""

from __future__ import annotations

import json

from cai.bench import gpu_check


def test_every_check_runs_and_the_json_names_the_device(tmp_path):
    out = tmp_path / "gpu-check.json"
    doc = gpu_check.run_checks("tiny-random", out, batches=(1, 3), new_tokens=4)
    assert json.loads(out.read_text()) == doc
    assert doc["device"] == "cpu" and doc["precision"].startswith("fp32")
    checks = doc["checks"]
    assert set(checks) == {"hf_generation", "lora_sft_step", "reward_step", "grpo_step"}
    assert doc["ok"], {k: v.get("error") for k, v in checks.items()}
    batches = checks["hf_generation"]["batches"]
    assert set(batches) == {"1", "3"} and all(b["tokens"] > 0 and b["tokens_per_s"] > 0 for b in batches.values())
    assert checks["lora_sft_step"]["steps"] == 1
    assert "vllm" in doc  # why the vLLM checks did not run


def test_a_failing_check_is_recorded_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("CUDA error: out of memory\n(details)")

    monkeypatch.setattr(gpu_check, "_hf_generation", broken)
    monkeypatch.setattr(gpu_check, "_sft_step", lambda spec, work: {"steps": 1})
    monkeypatch.setattr(gpu_check, "_reward_step", lambda spec, work: {})
    monkeypatch.setattr(gpu_check, "_grpo_step", lambda spec, work, use_vllm: {})
    doc = gpu_check.run_checks("tiny-random", tmp_path / "g.json")
    assert doc["ok"] is False
    assert doc["checks"]["hf_generation"] == {
        "ok": False,
        "error": "RuntimeError: CUDA error: out of memory",
        "seconds": doc["checks"]["hf_generation"]["seconds"],
    }
    assert all(doc["checks"][k]["ok"] for k in ("lora_sft_step", "reward_step", "grpo_step"))


def test_bad_batches_is_one_line_exit_2(capsys):
    assert gpu_check.main(["--batches", "0,x"]) == 2
    assert "--batches" in capsys.readouterr().out
