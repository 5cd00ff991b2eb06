"""AI-feedback labels: log-prob scoring of (A)/(B), both orders, principle ensembles, CoT clamp, diagnostics."""

from __future__ import annotations

import json
import math

import pytest

from cai.backends import Generation
from cai.constitution import load_constitution
from cai.errors import UserError
from cai.labeling import (LabelConfig, Pair, agreement_with_reference, label_diagnostics, label_pairs, label_record,
                          read_reference, reference_agreement, sample_principles)


class FakeFeedback:
    """A feedback model that prefers the option containing 'safe' (mode content) or always says (A)."""

    spec = "fake"

    def __init__(self, mode: str = "content"):
        self.mode, self.calls, self.prefixes = mode, 0, []

    def logprobs(self, prefixes, continuations):
        self.calls += 1
        self.prefixes += list(prefixes)
        out = []
        for chat, conts in zip(prefixes, continuations):
            assert conts == ["A", "B"] and chat[-1]["role"] == "assistant" and chat[-1]["content"].endswith("(")
            first = chat[0]["content"].split("(A) ")[1].split("\n(B)")[0]
            if self.mode == "position":
                out.append([0.0, -3.0])
            else:
                out.append([0.0, -2.0] if "safe" in first else [-2.0, 0.0])
        return out

    def generate(self, chats, sampling, progress=False):
        return [Generation("the first one is kinder", "stop") for _ in chats]


@pytest.fixture(scope="module")
def harmless():
    return load_constitution("harmless")


def _pairs(n: int = 4) -> list[Pair]:
    return [Pair(f"p{i}", f"question {i}", *(("safe answer", "rude answer") if i % 2 == 0 else
                                            ("rude answer", "safe answer"))) for i in range(n)]


def test_labels_follow_content_in_both_orders_with_one_batched_call(harmless):
    fb = FakeFeedback("content")
    pairs = _pairs(4)
    labels = label_pairs(fb, pairs, harmless, LabelConfig(principles_per_pair=3))
    assert fb.calls == 1 and len(fb.prefixes) == 4 * 3 * 2  # pairs x principles x orders, one call
    p_good = 1 / (1 + math.exp(-2.0))  # softmax of log-probs (0, -2)
    for pair, lab in zip(pairs, labels):
        want = p_good if pair.a == "safe answer" else 1 - p_good
        assert lab.p_a == pytest.approx(want) and lab.swap_consistent and len(lab.principles) == 3
        row = label_record(lab, pair)
        assert row["chosen"] == "safe answer" and row["rejected"] == "rude answer"
        assert 0.5 <= row["p_chosen"] <= 1 and row["source"] == "judge"
    diag = label_diagnostics([label_record(lab, p) for lab, p in zip(labels, pairs)])
    assert diag["swap_consistency"]["rate"] == 1.0 and diag["position_bias_first"] == pytest.approx(0.5)


def test_position_bias_cancels_and_is_reported(harmless):
    pairs = _pairs(6)
    labels = label_pairs(FakeFeedback("position"), pairs, harmless, LabelConfig())
    assert all(lab.p_a == pytest.approx(0.5) and not lab.swap_consistent for lab in labels)
    diag = label_diagnostics([label_record(lab, p) for lab, p in zip(labels, pairs)])
    assert diag["swap_consistency"]["rate"] == 0.0
    assert diag["label_entropy_bits"] == pytest.approx(1.0)
    assert diag["position_bias_first"] > 0.9


def test_cot_reasons_first_then_scores_and_clamps(harmless):
    fb = FakeFeedback("content")
    labels = label_pairs(fb, _pairs(2), harmless, LabelConfig(cot=True, principles_per_pair=1))
    assert all(0.4 <= lab.p_a <= 0.6 for lab in labels)
    assert labels[0].p_a == pytest.approx(0.6) and labels[1].p_a == pytest.approx(0.4)
    assert "the first one is kinder" in fb.prefixes[0][-1]["content"]
    assert labels[0].reasoning


def test_principle_sampling_is_reproducible_and_weighted(harmless):
    a = [p.name for p in sample_principles(harmless, "x", 3, seed=1)]
    assert a == [p.name for p in sample_principles(harmless, "x", 3, seed=1)] and len(set(a)) == 3
    picks = [sample_principles(harmless, f"id{i}", 1, 0, {"privacy": 1.0})[0].name for i in range(30)]
    assert picks.count("privacy") >= 25


def test_reference_agreement_and_bad_reference_files(tmp_path, harmless):
    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "safe answer", "rejected": "rude answer"}) + "\n"
                           for i in range(12)))
    pairs = read_reference(ref)
    good = reference_agreement(label_pairs(FakeFeedback("content"), pairs, harmless, LabelConfig()))
    assert good["agreement"] == 1.0 and good["above_chance"] and good["ci_low"] > 0.5
    coin = reference_agreement(label_pairs(FakeFeedback("position"), pairs, harmless, LabelConfig()))
    assert not coin["above_chance"] and "stronger feedback model" in coin["verdict"]
    # what `cai label --reference` and the preferences stage call: the same labels, in batches of two
    batched = agreement_with_reference(FakeFeedback("content"), pairs, harmless, LabelConfig(batch_pairs=2),
                                       progress=False)
    assert batched.pop("pairs_per_s") > 0 and batched == good
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "chosen": "x"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1: .*missing rejected"):
        read_reference(bad)
    with pytest.raises(UserError, match="not found"):
        read_reference(tmp_path / "nope.csv")


def test_tiny_model_labels_are_probabilities(tiny_backend, harmless):
    labels = label_pairs(tiny_backend, _pairs(2), harmless, LabelConfig(principles_per_pair=1))
    assert all(0.0 < lab.p_a < 1.0 for lab in labels)


@pytest.mark.smoke
def test_embedded_model_labels_a_clear_pair(real_backend, harmless):
    """The 135M model: labels are valid probabilities (whether they are *right* is what diagnostics measure)."""
    pair = Pair("s", "How do I pick a lock to break into my neighbour's house?",
                "I can't help with breaking into someone's home. If you're locked out of your own, call a locksmith.",
                "Sure! Insert a tension wrench, rake the pins, and you're in.")
    lab = label_pairs(real_backend, [pair], harmless, LabelConfig(principles_per_pair=2))[0]
    assert 0.0 < lab.p_a < 1.0 and len(lab.p_orders) == 2
