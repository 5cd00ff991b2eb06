"""The wheel a user gets from `pip install cai-lab`: built from a copy of the sources, installed (not editable)
into a fresh virtual environment, and run from a folder outside the checkout, where only what the wheel holds
can be found — `cai bench` and an experiment with its bundled config, on tiny-random.

The fresh environment borrows the heavy dependencies (torch, transformers, ...) from this interpreter's
site-packages through a .pth line instead of installing them again. A .pth line only adds a folder to sys.path:
the .pth files inside it, among them the editable install of this checkout, are not run, so `cai` can come only
from the wheel (asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from cai.evaluation.harm_classifier import WEIGHTS_FILE as HARM_WEIGHTS_FILE
from cai.evaluation.refusal_classifier import WEIGHTS_FILE

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKDOOR = ["--set", "policy=tiny-random", "--set", "batch_size=8", "--set", "runs_dir=runs",
                 "--set", "prompts={n_train_harmful: 4, n_train_benign: 4, n_eval_harmful: 3, n_eval_benign: 2}",
                 "--set", "decode={max_new_tokens: 6, temperature: 1.0}",
                 "--set", "insert={max_steps: 1, batch_size: 4, max_length: 64, eval_fraction: 0, save_steps: 50}"]


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(map(str, cmd))} → {res.returncode}\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of pyproject.toml, README.md and src/ only: nothing else of the checkout can leak in."""
    pytest.importorskip("setuptools", minversion="77", reason="building the wheel needs setuptools (the dev extra)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "source"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", str(tmp / "dist"), str(src)], tmp, env, timeout=300)
    (whl,) = (tmp / "dist").glob("cai_lab-*.whl")
    return whl


def test_wheel_holds_what_users_run(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("cai/bench/run.py", "cai/bench/labels.py", "cai/resources/configs/quickstart.yaml",
                 "cai/resources/configs/experiments/backdoor.yaml", "cai/resources/configs/experiments/unalign.yaml",
                 "cai/resources/configs/experiments/prefill_recovery.yaml", "cai/resources/constitutions/harmless.yaml",
                 "cai/resources/configs/experiments/controllability.yaml", "cai/resources/configs/experiments/subliminal.yaml", "cai/resources/tasks/controllability.jsonl",
                 f"cai/resources/judge/{WEIGHTS_FILE}", f"cai/resources/judge/{HARM_WEIGHTS_FILE}",
                 "cai/data/redteam.jsonl"):
        assert path in names, path
    assert not any(n.startswith(("benchmarks/", "configs/", "tests/")) for n in names)


def test_installed_wheel_runs_bench_and_an_experiment_outside_the_checkout(wheel, tmp_path, tiny_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # this interpreter's packages
    (site / "cai-test-deps.pth").write_text("".join(f"{p}\n" for p in deps))
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp_path, env, timeout=300)
    work = tmp_path / "elsewhere"  # outside the checkout: no benchmarks/, no configs/, no src/
    work.mkdir()

    where = _run([str(python), "-c", "import cai; print(cai.__file__)"], work, env, timeout=60).stdout.strip()
    assert Path(where).is_relative_to(site), f"cai imported from {where}, not from the wheel"

    cai = str(venv / "bin" / "cai")
    _run([cai, "bench", "--quick", "--only", "labels", "--model", "tiny-random"], work, env, timeout=300)
    results = json.loads((work / "docs" / "performance-quick.json").read_text())
    assert results["model"] == "tiny-random" and set(results["benchmarks"]) == {"labels"}

    res = _run([cai, "backdoor", "insert", *TINY_BACKDOOR], work, env, timeout=400)
    run = work / "runs" / "backdoor-cpu"  # the bundled backdoor config's run name
    assert "backdoored model →" in res.stdout
    assert json.loads((run / "insert" / "manifest.json").read_text())["status"] == "complete"
    assert (run / "insert" / "train" / "merged" / "config.json").is_file()

    bad = subprocess.run([cai, "run", "configs/quickstart.yaml"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "(bundled: quickstart)" in bad.stderr
