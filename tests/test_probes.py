"""The preference-probe instrument shared by ``cai subliminal`` and ``cai poison scan``."""

import json
import math

import pytest

from cai.errors import UserError
from cai.evaluation.metrics import t_summary
from cai.experiments.probes import (
    load_battery,
    paired_shift,
    rank_shifts,
    score_battery,
)


def test_bundled_battery_is_broad_and_well_formed():
    battery = load_battery()
    names = {c.name for c in battery}
    assert {"animal", "colour", "country", "food", "company", "person", "number"} <= names
    for cat in battery:
        assert len(cat.questions) >= 12, cat.name
        assert len(set(cat.questions)) == len(cat.questions), cat.name
        assert len({c.lower() for c in cat.candidates}) == len(cat.candidates), cat.name
    assert load_battery(categories=["animal"])[0].index("Owl") == load_battery()[0].candidates.index("owl")


def test_bad_battery_input_names_the_problem(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_battery(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"categories": {"animal": {"noun": "animal"}}}))
    with pytest.raises(UserError, match="not a valid battery"):
        load_battery(bad)
    with pytest.raises(UserError, match="unknown probe categories"):
        load_battery(categories=["animals"])
    with pytest.raises(UserError, match="not a candidate"):
        load_battery(categories=["animal"])[0].index("dragon")


def test_scores_are_distributions_over_the_candidates(tiny_backend):
    battery = load_battery(categories=["season", "planet"])
    scores = score_battery(tiny_backend, battery)
    for cat in battery:
        rows = scores[cat.name]
        assert len(rows) == len(cat.questions)
        for row in rows:
            assert len(row) == len(cat.candidates)
            assert sum(math.exp(v) for v in row) == pytest.approx(1.0, abs=1e-6)
    # A system prompt changes the context, so the scores move.
    other = score_battery(tiny_backend, battery[:1], system="Winter is your favourite season.")
    assert other["season"] != scores["season"]


def _uniform(n_q, n_c):
    return [[-math.log(n_c)] * n_c for _ in range(n_q)]


def test_paired_shift_detects_a_planted_preference_and_not_noise():
    ref = _uniform(16, 4)
    planted = [[math.log(0.4 + 0.01 * (q % 3)), *[math.log((0.6 - 0.01 * (q % 3)) / 3)] * 3] for q in range(16)]
    up = paired_shift(ref, planted, 0)
    assert up["delta_p"] == pytest.approx(0.41 - 0.25, abs=0.01)
    assert up["delta_logit_ci_low"] > 0 and up["t"] > 10 and up["p_value"] < 0.001
    down = paired_shift(ref, planted, 1)
    assert down["delta_logit"] < 0
    same = paired_shift(ref, ref, 0)
    assert same["delta_p"] == 0 and same["t"] == 0 and same["p_value"] == 1.0
    season = load_battery(categories=["season"])[0]  # four candidates, spring first
    ranked = rank_shifts({"season": ref}, {"season": planted}, [season])
    assert [r["candidate"] for r in ranked][0] == "spring"
    assert len(ranked) == 4 and all(r["t"] < 0 for r in ranked[1:])


def test_t_summary_uses_a_t_interval():
    s = t_summary([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["n"] == 3
    assert s["ci_high"] - 2.0 == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-3)
