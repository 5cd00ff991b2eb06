"""The distributed training path on this machine: `accelerate launch` with 2 CPU processes (gloo) runs one
real SFT step of cai.training.sft.train_sft on the tiny model (configs/accelerate/cpu-2proc.yaml, which uses
the torchrun launcher: accelerate's own `--cpu` multi-process launcher needs mpirun and would start one process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sft_step_under_accelerate_two_cpu_processes(tmp_path, tiny_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.is_file():
        pytest.skip("accelerate CLI not installed next to this python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [str(accelerate), "launch", "--config_file", str(ROOT / "configs/accelerate/cpu-2proc.yaml"),
           str(ROOT / "tests/distributed_sft.py"), str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]  # both processes joined one process group
    assert all(r["steps"] == 1 for r in ranks)
    merged = Path(ranks[0]["merged"])
    assert (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))
    assert json.loads((tmp_path / "sft" / "metrics.json").read_text())["steps"] == 1
