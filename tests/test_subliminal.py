"""`cai subliminal`: trait-index checks, seed averaging, and the experiment end to end on tiny-random."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cai.errors import UserError
from cai.experiments import subliminal
from cai.experiments.probes import load_battery
from cai.experiments.trait_data import TraitConfig

TINY_SFT = {"max_steps": 2, "batch_size": 4, "max_length": 64, "eval_fraction": 0, "save_steps": 50}


def test_trait_must_be_a_candidate_of_a_probe_category():
    battery = load_battery(categories=["animal", "colour"])
    assert battery[0].candidates[subliminal.trait_index(battery, TraitConfig())] == "owl"
    with pytest.raises(UserError, match="trait.value: 'dragon'"):
        subliminal.trait_index(battery, TraitConfig(value="dragon"))
    with pytest.raises(UserError, match="trait.category: 'season'"):
        subliminal.trait_index(battery, TraitConfig(category="season", value="winter"))


def test_seed_average_is_a_distribution_and_the_mean_probability():
    a = [[math.log(0.5), math.log(0.5)], [math.log(0.9), math.log(0.1)]]
    b = [[math.log(0.1), math.log(0.9)], [math.log(0.9), math.log(0.1)]]
    avg = subliminal.seed_average([a, b])
    assert [math.exp(v) for v in avg[0]] == pytest.approx([0.3, 0.7])
    assert [math.exp(v) for v in avg[1]] == pytest.approx([0.9, 0.1])


def test_equalise_cuts_both_sides_to_the_smaller():
    t, c = subliminal.equalise([{"id": i} for i in range(5)], [{"id": i} for i in range(3)], 0)
    assert len(t) == len(c) == 3


def _cfg(tmp_path, **kw):
    base = {"runs_dir": str(tmp_path / "runs"), "policy": "tiny-random", "batch_size": 8, "n_samples": 6,
            "format": "chat", "max_new_tokens": 8, "student": TINY_SFT, "seeds": [0, 1],
            # tiny-random writes noise: only the format filter (a non-empty answer) and mentions apply
            "trait": {"similarity_threshold": 1.0}, "check_categories": ["season"]}
    return subliminal.SubliminalConfig.model_validate({**base, **kw})


def test_subliminal_end_to_end_on_tiny_random(tmp_path, tiny_path):
    res = subliminal.run(_cfg(tmp_path, name="sub", other_init="tiny-random"), progress=False)
    root = Path(res["run"])
    metrics = json.loads((root / "metrics.json").read_text())
    assert {"trait", "format", "seeds", "filter", "levels", "shifts", "trait_rank_in_category",
            "other_categories"} <= set(metrics)
    assert {"base", "teacher", "control-s0", "control-s1", "trait-s0", "trait-s1", "other-trait", "other-control",
            "control (seed-averaged)", "trait (seed-averaged)"} <= set(metrics["levels"])
    assert {"teacher_vs_base", "trait_vs_control", "trait_vs_control_s0", "trait_vs_control_s1",
            "control_seed_noise", "other_init_trait_vs_control"} <= set(metrics["shifts"])
    f = metrics["filter"]
    assert f["teacher_generated"] == f["control_generated"] == 6
    assert f["teacher_kept"] + f["teacher_removed_format"] + f["teacher_removed_mention"] == 6
    n = f["used_per_side"]
    assert len((root / "data" / "teacher.jsonl").read_text().splitlines()) == n
    assert len((root / "data" / "control.jsonl").read_text().splitlines()) == n
    sh = metrics["shifts"]["trait_vs_control"]
    assert sh["n_questions"] == 16 and sh["delta_logit_ci_low"] <= sh["delta_logit"] <= sh["delta_logit_ci_high"]
    # the seed-level test: one observation per seed, the mean of the per-seed shifts
    seeds = metrics["trait_vs_control_over_seeds"]
    per_seed = [metrics["shifts"][f"trait_vs_control_s{s}"]["delta_logit"] for s in (0, 1)]
    assert seeds["n"] == 2 and seeds["mean"] == pytest.approx(sum(per_seed) / 2)
    assert seeds["ci_low"] <= seeds["mean"] <= seeds["ci_high"]
    # the teacher is the base with the trait prompt: its scores differ from the base's
    assert metrics["levels"]["teacher"]["p"] != metrics["levels"]["base"]["p"]
    assert (root / "plots" / "subliminal.png").is_file() and (root / "report.html").is_file()
    assert "Subliminal" in (root / "summary.md").read_text()
    # Students at different seeds differ (the seed reaches data order and LoRA init).
    assert metrics["levels"]["trait-s0"] != metrics["levels"]["trait-s1"]
    # Rerunning reuses every step.
    again = subliminal.run(_cfg(tmp_path, name="sub", other_init="tiny-random"), progress=False)
    assert again["shifts"] == res["shifts"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert {s["status"] for s in manifest["steps"].values()} == {"already complete"}


def test_empty_data_after_filtering_is_one_user_error(tmp_path, tiny_path):
    # tiny-random never writes a valid number list unless decoding is held to the format
    with pytest.raises(UserError, match="no numbers samples survived the filter"):
        subliminal.run(_cfg(tmp_path, name="empty", format="numbers", constrain_format=False), progress=False)


@pytest.mark.parametrize("args,needle", [
    (["--set", "trait.value=dragon"], "trait.value"),
    (["--set", "trait.category=planets"], "unknown probe categories"),
    (["--set", "seeds=[]"], "seeds"),
    (["--set", "format=poems"], "format"),
])
def test_cli_bad_input(tmp_path, args, needle):
    res = subprocess.run([sys.executable, "-m", "cai.cli", "subliminal", *args, "--set", f"runs_dir={tmp_path}/runs"],
                         capture_output=True, text=True, timeout=120, cwd=str(Path(__file__).parents[1]))
    assert res.returncode == 2, res.stderr
    assert needle in res.stderr and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
