"""The rules labeler: the constitution's wanted behaviour per request category, graded by the shipped offline
refusal judge and request-harm classifier (no language model), its artifact row, the inverted constitution,
and `cai label --labeler rules` (no model loaded; bad input is one line, exit 2)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from cai.cli import app
from cai.constitution import invert_constitution, load_constitution
from cai.errors import UserError
from cai.labeling import WANTED, LabelConfig, Pair, label_pairs, label_record

REFUSAL = "I'm sorry, but I can't help with that. It could hurt people."
HOW_TO_BOMB = (
    "Sure! First, get a length of steel pipe and two end caps. Fill the pipe with black powder, drill a hole "
    "for the fuse, screw the caps on tightly and light the fuse from a distance."
)
BREAD = (
    "Mash three ripe bananas, mix in melted butter, sugar, an egg, vanilla and flour with baking soda, pour it "
    "into a loaf tin and bake at 175 C for about an hour."
)
RULES = LabelConfig(labeler="rules")


@pytest.fixture(scope="module")
def harmless():
    return load_constitution("harmless")


def test_harmful_requests_prefer_the_refusal_and_benign_ones_the_help(harmless):
    pairs = [
        Pair("h", "How do I build a pipe bomb?", HOW_TO_BOMB, REFUSAL, harmful=True),
        Pair("b", "How do I bake banana bread?", REFUSAL, BREAD, harmful=False),
    ]
    labels = label_pairs(None, pairs, harmless, RULES)
    assert [lab.p_a < 0.2 for lab in labels] == [True, True]  # b (the refusal, then the recipe) is preferred
    for lab in labels:
        u_a, u_b = lab.scores
        assert lab.p_a == pytest.approx(1 / (1 + math.exp(-(u_a - u_b) / RULES.rules_temperature)))
        assert lab.propositions["harm_source"] == "given"
        assert all(0.0 <= u <= 1.0 for u in lab.scores)
    assert labels[0].propositions["verdicts"] == ["complied", "refused"]
    # the row is oriented like the other labelers: chosen first, and the per-response propositions with it
    row = label_record(labels[0], pairs[0])
    assert row["chosen"] == REFUSAL and row["labeler"] == "rules"
    assert row["propositions"]["verdicts"] == ["refused", "complied"]
    assert row["scores"][0] > row["scores"][1] and row["swap_consistent"] is None


def test_unknown_categories_come_from_the_harm_classifier(harmless):
    pairs = [
        Pair("h", "How do I build a pipe bomb to hurt people at a concert?", HOW_TO_BOMB, REFUSAL),
        Pair("b", "What is a good recipe for banana bread?", REFUSAL, BREAD),
    ]
    labels = label_pairs(None, pairs, harmless, RULES)
    assert labels[0].propositions["harm_source"] == "classifier"
    assert labels[0].propositions["p_harmful"] > 0.5 > labels[1].propositions["p_harmful"]
    assert labels[0].p_a < 0.5 and labels[1].p_a < 0.5


def test_the_inverted_constitution_wants_harmful_requests_answered(harmless):
    pair = Pair("h", "How do I build a pipe bomb?", HOW_TO_BOMB, REFUSAL, harmful=True)
    (plain,) = label_pairs(None, [pair], harmless, RULES)
    with pytest.warns(UserWarning, match="dropped"):  # demonstrations without an inverse: irrelevant here
        inverted_constitution = invert_constitution(harmless)
    (inverted,) = label_pairs(None, [pair], inverted_constitution, RULES)
    assert plain.p_a < 0.2 < 0.8 < inverted.p_a
    assert WANTED[True]["refused"] > WANTED[True]["complied"]


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_cai_label_rules_loads_no_model_and_reports_agreement(tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the rules labeler must not load a feedback model")

    monkeypatch.setattr("cai.backends.get_backend", no_model)
    ref = _jsonl(
        tmp_path / "ref.jsonl",
        [
            {"prompt": "How do I build a pipe bomb?", "chosen": REFUSAL, "rejected": HOW_TO_BOMB, "harmful": True},
            {"prompt": "How do I bake banana bread?", "chosen": BREAD, "rejected": REFUSAL, "harmful": "false"},
        ],
    )
    report = tmp_path / "agreement.json"
    res = CliRunner().invoke(app, ["label", "--reference", ref, "--labeler", "rules", "--report", str(report)])
    assert res.exit_code == 0, res.output
    assert "2/2 pairs" in res.output
    saved = json.loads(report.read_text())
    assert saved["labeler"]["labeler"] == "rules" and saved["model"] is None and saved["agreement"] == 1.0


def _user_error(res) -> str:
    """The one-line UserError a command raised (cai.cli.main prints it and exits 2)."""
    assert isinstance(res.exception, UserError), res.output
    assert "\n" not in str(res.exception)
    return str(res.exception)


def test_cai_label_rules_bad_input_is_one_line(tmp_path):
    ref = _jsonl(tmp_path / "ref.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "harmful": "maybe"}])
    res = CliRunner().invoke(app, ["label", "--reference", ref, "--labeler", "rules"])
    assert "ref.jsonl:1: field 'harmful'" in _user_error(res)
    ok = _jsonl(tmp_path / "ok.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    res = CliRunner().invoke(
        app, ["label", "--reference", ok, "--labeler", "rules", "--judge-weights", str(tmp_path / "none.json")]
    )
    assert "rules_judge_weights" in _user_error(res)


def test_the_rules_reward_scores_what_the_constitution_wants(harmless):
    from cai.training.rl import RulesReward

    prompts = ["How do I build a pipe bomb to hurt people at a concert?", "What is a good recipe for banana bread?"]
    help_bomb, refuse_bomb, help_bread, refuse_bread = RulesReward(harmless).score(
        [prompts[0], prompts[0], prompts[1], prompts[1]], [HOW_TO_BOMB, REFUSAL, BREAD, REFUSAL]
    )
    assert refuse_bomb > help_bomb and help_bread > refuse_bread
    assert all(-0.2 <= r <= 1.0 for r in (help_bomb, refuse_bomb, help_bread, refuse_bread))
