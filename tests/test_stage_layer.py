"""The stage layer: the shared artifact readers (one checkpoint lookup for SL/RL/DPO) and the layering rule that a
stage imports neither the orchestrator nor a sibling stage."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from cai.config import load_config
from cai.runs import RunDir
from cai.stages import STAGES
from cai.stages.artifacts import checkpoints, final_model_spec, sl_model_spec

SRC = Path(__file__).resolve().parents[1] / "src" / "cai"


def _trained(run: RunDir, stage: str, folder: str, finished_at: str, *, complete: bool = True) -> Path:
    model = run.root / stage / folder
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (run.root / stage / "manifest.json").write_text(json.dumps(
        {"status": "complete" if complete else "running", "config_hash": f"h-{stage}", "finished_at": finished_at}))
    return model


def test_checkpoints_in_data_flow_order_and_the_final_model(tmp_path):
    cfg = load_config(None, ["models.policy=tiny-random"])
    run = RunDir(tmp_path / "r")
    assert list(checkpoints(run, cfg)) == ["base"]
    assert sl_model_spec(run, cfg) == final_model_spec(run, cfg) == "tiny-random"
    sl = _trained(run, "sft", "merged", "2026-01-01T00:00:00")
    assert sl_model_spec(run, cfg) == final_model_spec(run, cfg) == str(sl)
    dpo = _trained(run, "dpo", "model", "2026-01-03T00:00:00")
    rl = _trained(run, "rl", "model", "2026-01-02T00:00:00")
    cps = checkpoints(run, cfg)
    assert list(cps) == ["base", "sl", "rl", "dpo"]
    assert cps["rl"].fingerprint == f"{rl}@h-rl@2026-01-02T00:00:00" and cps["base"].spec == "tiny-random"
    assert final_model_spec(run, cfg) == str(dpo)  # the one that finished last
    assert sl_model_spec(run, cfg) == str(sl)  # what preferences/reward/rl/dpo start from
    (rl.parent / "manifest.json").write_text(json.dumps({"status": "complete", "finished_at": "2026-01-04T00:00:00"}))
    assert final_model_spec(run, cfg) == str(rl)


def test_an_unfinished_or_empty_training_stage_is_no_checkpoint(tmp_path):
    cfg = load_config(None, ["models.policy=tiny-random"])
    run = RunDir(tmp_path / "r")
    _trained(run, "rl", "model", "2026-01-02T00:00:00", complete=False)
    (run.root / "dpo").mkdir()
    (run.root / "dpo" / "manifest.json").write_text(json.dumps({"status": "complete"}))  # no model folder
    assert list(checkpoints(run, cfg)) == ["base"] and final_model_spec(run, cfg) == "tiny-random"


def _cai_imports(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
        elif isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
    return {m for m in mods if m == "cai" or m.startswith("cai.")}


STAGE_HELPERS = ("cai.stages.artifacts", "cai.stages.model_cards")


def test_no_stage_imports_the_orchestrator_or_a_sibling_stage():
    upward = ("cai.pipeline", "cai.config", "cai.cli", "cai.commands", "cai.experiments")
    for name, module in STAGES.items():
        path = SRC / "stages" / f"{module.rsplit('.', 1)[1]}.py"
        imports = _cai_imports(path)
        assert not [m for m in imports if m.startswith(upward)], f"stage {name} imports a floor above it"
        # the two shared helpers of the stage layer: what a stage reads (artifacts) and the run's model cards
        siblings = [m for m in imports if m.startswith("cai.stages.") and m not in STAGE_HELPERS]
        assert not siblings, f"stage {name} imports sibling stage(s) {siblings}; read artifacts via cai.stages.artifacts"
    for helper in STAGE_HELPERS:
        assert not set(_cai_imports(SRC / "stages" / f"{helper.rsplit('.', 1)[1]}.py")) & set(STAGES.values())
    assert not [m for m in _cai_imports(SRC / "config.py") if m.startswith("cai.pipeline")]


def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter: an import cycle fails here whichever module is imported first."""
    modules = sorted(".".join(p.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")
                     for p in SRC.rglob("*.py"))
    script = ("import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n")
    for m in modules:
        res = subprocess.run([sys.executable, "-c", script, m], capture_output=True, text=True)
        assert res.returncode == 0, f"import {m} failed:\n{res.stderr[-2000:]}"
