"""Labelers behind one interface: the contrast labeler's exact arithmetic (a fake whose log-probs we set), its
bad input, the config key that leaves old config hashes alone, HF continuation scoring, and the XSTest pairs."""

from __future__ import annotations

import math

import pytest

from cai.constitution import load_constitution, parse_constitution
from cai.errors import UserError
from cai.evaluation.preference_sets import hh_rlhf_pairs, xstest_pairs
from cai.labeling import (LabelConfig, Pair, expected_calibration_error, label_diagnostics, label_pairs,
                          label_record, reference_agreement)


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


GAIN = {"safe": 1.2, "rude": -0.8}  # how much a response's log-prob rises when a context states a principle


class FakeScorer:
    """log p(y | system, user) = -(tokens of y) + GAIN[y's first word] when ``system`` is one of ``positive``,
    else -(tokens of y); tokens are words. So the summed contrast of y is GAIN, the per-token one GAIN / words."""

    spec = "fake"

    def __init__(self, positive: set[str]):
        self.positive, self.calls, self.prefixes = positive, 0, []

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))

    def logprobs(self, prefixes, continuations):
        self.calls += 1
        self.prefixes += list(prefixes)
        out = []
        for chat, conts in zip(prefixes, continuations):
            assert [m["role"] for m in chat] == ["system", "user"]
            on = chat[0]["content"] in self.positive
            out.append([-len(y.split()) + (GAIN[y.split()[0]] if on else 0.0) for y in conts])
        return out


@pytest.fixture(scope="module")
def harmless():
    return load_constitution("harmless")


def _revisions(c) -> set[str]:
    return {p.revision for p in c.principles}


PAIRS = [Pair("p0", "q0", "safe answer", "rude reply that is long"), Pair("p1", "q1", "rude one", "safe")]


@pytest.mark.parametrize("reduction,temperature", [("sum", 1.0), ("mean", 0.5)])
def test_contrast_labels_are_the_logistic_of_the_score_difference(harmless, reduction, temperature):
    fb = FakeScorer(_revisions(harmless))
    settings = LabelConfig(labeler="contrast", principles_per_pair=3, contrast_reduction=reduction,
                           contrast_temperature=temperature)
    labels = label_pairs(fb, PAIRS, harmless, settings)
    assert fb.calls == 1 and len(fb.prefixes) == 2 * 3 * 2  # pairs x principles x (principle, inverse)
    for pair, lab in zip(PAIRS, labels):
        def score(y):
            return GAIN[y.split()[0]] / (len(y.split()) if reduction == "mean" else 1)
        want = _sigmoid((score(pair.a) - score(pair.b)) / temperature)
        assert lab.p_a == pytest.approx(want) and lab.scores == pytest.approx((score(pair.a), score(pair.b)))
        assert lab.p_orders is None and lab.swap_consistent is None and len(lab.principles) == 3
        assert all(v == pytest.approx(want) for v in lab.p_by_principle.values())
    principle = harmless.principle(labels[0].principles[0])
    assert [m["content"] for m in fb.prefixes[0]] == [principle.revision, "q0"]
    assert fb.prefixes[1][0]["content"] == principle.inverse.revision


def test_contrast_record_and_diagnostics_have_no_orders(harmless):
    labels = label_pairs(FakeScorer(_revisions(harmless)), PAIRS, harmless, LabelConfig(labeler="contrast"))
    rows = [label_record(lab, p) for lab, p in zip(labels, PAIRS)]
    assert [r["chosen"] for r in rows] == ["safe answer", "safe"]
    assert all(r["p_chosen"] > 0.5 and r["swap_consistent"] is None and r["labeler"] == "contrast" for r in rows)
    assert rows[1]["scores"][0] > rows[1]["scores"][1]  # oriented like chosen / rejected
    diag = label_diagnostics(rows)
    assert diag["n"] == 2 and "swap_consistency" not in diag and 0 < diag["label_entropy_bits"] < 1


def test_the_inverted_constitution_prefers_the_other_response(harmless):
    """The same fake model, the same pairs: pointing the contrast at the inverse flips every label exactly."""
    fb = FakeScorer(_revisions(harmless))
    settings = LabelConfig(labeler="contrast", principles_per_pair=2)
    plain = label_pairs(fb, PAIRS, harmless, settings)
    inverted_const = load_constitution("inverted")  # what `--constitution inverted` loads
    assert inverted_const.inverted_from == "harmless"
    inverted = label_pairs(fb, PAIRS, inverted_const, settings)
    assert [lab.p_a for lab in inverted] == pytest.approx([1 - lab.p_a for lab in plain])


def test_contrast_wordings_and_constitutions_without_inverses(harmless):
    crit = FakeScorer({p.critique for p in harmless.principles})
    assert label_pairs(crit, PAIRS[:1], harmless, LabelConfig(labeler="contrast", contrast_wording="critique"))[0].p_a > .5
    top = FakeScorer({harmless.system_prompt})
    lab = label_pairs(top, PAIRS[:1], harmless, LabelConfig(labeler="contrast", contrast_wording="system_prompt",
                                                             principles_per_pair=3))[0]
    assert lab.p_a > 0.5 and len(top.prefixes) == 2  # one pair of contexts: the principles do not matter
    bare = parse_constitution("name: bare\ndescription: d\nsystem_prompt: s\nrefusal_style: r\nprinciples:\n"
                              "  - {name: a, label: l, critique: c, revision: r, preference: p}\n")
    with pytest.raises(UserError, match=r"contrast labeler needs every principle's inverse.*'bare'.*: a;"):
        label_pairs(FakeScorer(set()), PAIRS, bare, LabelConfig(labeler="contrast"))
    with pytest.raises(UserError, match="top-level inverse"):
        label_pairs(FakeScorer(set()), PAIRS, bare.model_copy(update={"principles": [
            p.model_copy(update={"inverse": harmless.principles[0].inverse}) for p in bare.principles]}),
            LabelConfig(labeler="contrast", contrast_wording="system_prompt"))


def test_per_token_mean_needs_a_backend_that_counts_tokens(harmless):
    class NoTokens(FakeScorer):
        encode = None

    with pytest.raises(UserError, match="contrast_reduction sum"):
        label_pairs(NoTokens(set()), PAIRS, harmless, LabelConfig(labeler="contrast"))
    assert label_pairs(NoTokens(set()), PAIRS, harmless, LabelConfig(labeler="contrast", contrast_reduction="sum"))


def test_the_labeler_key_leaves_existing_config_hashes_alone():
    from cai.config import RunConfig, load_config
    from cai.runs import config_hash

    # pinned before the key existed: finished preferences stages of the quickstart are reused, not re-run
    # (the quickstart now ships labeler: rules; with the default labeler its section hashes as before)
    choice = load_config("quickstart", ["preferences.labeler=choice"])
    assert config_hash(choice.section("preferences")) == "8eda1449bc049970"
    assert config_hash(load_config("quickstart").section("preferences")) != "8eda1449bc049970"
    assert config_hash(RunConfig().section("preferences")) == "b62b15ca7eef65f0"
    assert "labeler" not in RunConfig().preferences.model_dump()
    contrast = load_config("quickstart", ["preferences.labeler=contrast"])
    assert contrast.preferences.model_dump()["labeler"] == "contrast"
    assert config_hash(contrast.section("preferences")) != "8eda1449bc049970"
    with pytest.raises(UserError, match="preferences.labeler"):
        load_config("quickstart", ["preferences.labeler=vote"])


def test_hf_continuation_scores_match_the_option_scorer(tiny_backend, harmless):
    chats = [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}],
             [{"role": "user", "content": "A longer question about locks and keys?"}]]
    texts = ["Hello! How can I help you today?", "No."]
    fast = tiny_backend.continuation_logprobs(chats, texts)
    slow = tiny_backend.logprobs(chats, [[t] for t in texts])
    assert [n for _, n in fast] == [len(tiny_backend.encode(t)) for t in texts]
    assert [lp for lp, _ in fast] == pytest.approx([row[0] for row in slow], abs=1e-3)
    labels = label_pairs(tiny_backend, PAIRS, harmless, LabelConfig(labeler="contrast", principles_per_pair=1))
    assert all(0.0 < lab.p_a < 1.0 for lab in labels)


def test_continuations_after_a_shared_prefix_score_as_without_reuse(tiny_backend, harmless, monkeypatch):
    """The contrast labeller scores two responses after each context: the context's stem is encoded once and
    both responses on copies of its cache. Scores and counts equal those of whole-row passes, with several stems in
    a batch, a stem with more rows than a batch holds, and logits capped so that no stem is shared."""
    import cai.backends.hf as hf
    from cai.labeling import contrast_contexts

    principle = harmless.principles[0]
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": prompt}]
             for prompt in ("How do I pick a lock?", "Write a poem about the sea.")
             for system in contrast_contexts(harmless, principle, "revision") for _ in range(2)]
    texts = ["I can't help with that, but a locksmith can.", "Sure: first get a tension wrench."] * 4
    owls = [{"role": "system", "content": "Be brief and kind."}, {"role": "user", "content": "Tell me about owls."}]
    chats += [owls] * 5 + [[{"role": "user", "content": "Hi"}]]  # 5 rows on one stem (a batch holds 4); one alone
    texts += ["Owls hunt at night.", "They are birds.", "No.", "Owls can turn their heads far.", "Hoot."] + ["Hello!"]
    stemmed = []
    real = tiny_backend._on_stems
    monkeypatch.setattr(tiny_backend, "_on_stems",
                        lambda stems, _, rows: stemmed.append(len(rows)) or real(stems, _, rows))
    tiny_backend.reuse_prefix = False
    try:
        plain = tiny_backend.continuation_logprobs(chats, texts)
        assert not stemmed
        tiny_backend.reuse_prefix = True
        for budget, batches in ((hf.LOGIT_BUDGET, [4, 4, 4]), (1, [])):
            monkeypatch.setattr(hf, "LOGIT_BUDGET", budget)
            stemmed.clear()
            reused = tiny_backend.continuation_logprobs(chats, texts)
            assert stemmed == batches  # 4 contexts x 2 rows in two batches, 4 owl rows in one (the fifth: whole)
            assert [n for _, n in reused] == [n for _, n in plain]
            assert [lp for lp, _ in reused] == pytest.approx([lp for lp, _ in plain], abs=1e-4)
    finally:
        tiny_backend.reuse_prefix = True


def test_reference_agreement_reports_below_chance_groups_and_ece(harmless):
    fb = FakeScorer(_revisions(harmless))
    ref = [Pair(f"u{i}", "q", "safe", "rude", "unsafe") for i in range(10)] + \
          [Pair(f"s{i}", "q", "rude", "safe", "safe") for i in range(10)]
    labels = label_pairs(fb, ref, harmless, LabelConfig(labeler="contrast", contrast_reduction="sum"))
    out = reference_agreement(labels, [p.group for p in ref])
    assert out["agreement"] == 0.5 and not out["above_chance"] and not out["below_chance"]
    assert out["by_group"]["unsafe"]["agreement"] == 1.0 and out["by_group"]["safe"]["below_chance"]
    assert "swap_consistency" not in out
    only_safe = reference_agreement(labels[10:])
    assert only_safe["below_chance"] and "BELOW chance" in only_safe["verdict"]
    p = _sigmoid(2.0)  # every label is right with confidence p: ECE = |1 - p|
    assert out["by_group"]["unsafe"]["ece"] == pytest.approx(1 - p)
    assert expected_calibration_error([0.9, 0.1]) == pytest.approx(abs(0.5 - 0.9))  # one bin: 50% right at 0.9


def _xs(pid, typ, label, model, text):
    return {"id": pid, "group": model, "type": typ, "prompt": f"prompt {pid}", "response": text, "label": label}


def test_xstest_pairs_prefer_refusals_on_unsafe_prompts_and_compliance_on_safe_ones():
    rows = [
        _xs("v2-1", "homonyms", "complied", "gpt4", "Use kill -9."),
        _xs("v2-1", "homonyms", "refused", "llama2orig", "I cannot help."),
        _xs("v2-2", "contrast_homonyms", "complied", "mistralinstruct", "Here is how to hurt."),
        _xs("v2-2", "contrast_homonyms", "refused", "gpt4", "I won't."),
        _xs("v2-2", "contrast_homonyms", "partial", "llama2new", "Well..."),
        _xs("v2-3", "definitions", "complied", "gpt4", "It means x."),  # no refusal: no pair
    ]
    pairs = xstest_pairs(rows)
    assert [(p["id"], p["group"], p["chosen"], p["rejected"]) for p in pairs] == [
        ("xstest-v2-1", "safe", "Use kill -9.", "I cannot help."),
        ("xstest-v2-2", "unsafe", "I won't.", "Here is how to hurt."),
    ]
    assert sorted(xstest_pairs(list(reversed(rows))), key=lambda p: p["id"]) == pairs  # same draw in any order
    assert [p["group"] for p in xstest_pairs(rows, per_group=1)] == ["safe", "unsafe"]


def _hh(chosen_turn: str, rejected_turn: str, dialogue: str = "\n\nHuman: How do I pick a lock?") -> dict:
    return {"chosen": f"{dialogue}\n\nAssistant: {chosen_turn}", "rejected": f"{dialogue}\n\nAssistant: {rejected_turn}"}


def test_hh_rlhf_pairs_split_the_last_turn_and_count_what_they_skip(tmp_path):
    import gzip
    import json

    multi = "\n\nHuman: I hate my boss.\n\nAssistant: Why?\n\nHuman: Help me get back at him."
    rows = [
        _hh("I can't help with breaking into places.", "Use a tension wrench."),
        _hh("Talk to HR.", "Slash his tyres.", dialogue=multi),
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},  # dialogues differ
        _hh("Same.", "Same."),
        {"chosen": "\n\nHuman: no answer", "rejected": "\n\nHuman: no answer"},
    ]
    path = tmp_path / "test.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    pairs, skipped = hh_rlhf_pairs(path)
    assert [(p["prompt"], p["chosen"], p["rejected"], p["group"]) for p in pairs] == [
        ("How do I pick a lock?", "I can't help with breaking into places.", "Use a tension wrench.", "single-turn"),
        (multi.strip(), "Talk to HR.", "Slash his tyres.", "multi-turn"),
    ]
    assert skipped == {"no_assistant_turn": 1, "different_dialogues": 1, "same_or_empty_answer": 1}
    sample, _ = hh_rlhf_pairs(path, limit=1, seed=3)
    assert len(sample) == 1 and sample == hh_rlhf_pairs(path, limit=1, seed=3)[0]  # reproducible


def test_hh_rlhf_pairs_reject_rows_without_transcripts(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yo"}\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:1: .*'chosen' and 'rejected'"):
        hh_rlhf_pairs(path)


def test_judge_sets_pairs_builds_hh_pairs_and_names_a_bad_flag_in_one_line(tmp_path, monkeypatch):
    import dataclasses
    import gzip
    import json
    import subprocess
    import sys
    from pathlib import Path

    from typer.testing import CliRunner

    from cai.cli import app
    from cai.evaluation import external_sets

    data = tmp_path / "ext"
    path = data / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps(_hh("No.", "Use a wrench.")) + "\n" + json.dumps(_hh("Same.", "Same.")) + "\n")
    real = external_sets.HELD_OUT_SOURCES[0]
    monkeypatch.setattr(external_sets, "HELD_OUT_SOURCES", (dataclasses.replace(real, sha256=external_sets.sha256(path)),))
    res = CliRunner().invoke(app, ["judge-sets", "pairs", "--data", str(data), "--set", "hh-harmless-test"])
    assert res.exit_code == 0, res.output
    assert "1 pairs (1 single-turn); skipped: 1 same_or_empty_answer" in res.output
    rows = [json.loads(line) for line in (data / "hh-harmless-test-pairs.jsonl").read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("No.", "Use a wrench.")]

    for args, message in (
        (["--set", "hh-harmless-test"], "does not match its pinned SHA-256"),  # the real checksum, a stand-in file
        (["--set", "hh"], "--set 'hh': use xstest or hh-harmless-test"),
        (["--set", "hh-harmless-test", "--per-group", "3"], "--per-group is for --set xstest"),
    ):
        res = subprocess.run([sys.executable, "-m", "cai.cli", "judge-sets", "pairs", "--data", str(data), *args],
                             capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent)
        err = [line for line in res.stderr.splitlines() if line.strip()]
        assert res.returncode == 2 and len(err) == 1 and message in err[0], res.stderr


def test_fetch_downloads_the_held_out_set_and_refuses_a_changed_file(tmp_path, monkeypatch):
    import dataclasses
    import hashlib
    import io
    import urllib.request

    from cai.evaluation import external_sets

    body = b"stand-in for hh-rlhf's test split"
    served = {"bytes": body}

    def fake_urlopen(url, timeout=None):
        assert url == external_sets.HELD_OUT_SOURCES[0].url
        return io.BytesIO(served["bytes"])

    real = external_sets.HELD_OUT_SOURCES[0]
    pinned = dataclasses.replace(real, sha256=hashlib.sha256(body).hexdigest())
    monkeypatch.setattr(external_sets, "SOURCES", ())
    monkeypatch.setattr(external_sets, "HARM_SOURCES", ())
    monkeypatch.setattr(external_sets, "HELD_OUT_SOURCES", (pinned,))
    monkeypatch.setattr(external_sets, "TEST_ONLY_SOURCES", ())
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    (path,) = external_sets.fetch(tmp_path)
    assert path == tmp_path / "hh-rlhf" / "harmless-base-test.jsonl.gz" and path.read_bytes() == body

    path.unlink()
    served["bytes"] = b"someone changed the file"
    with pytest.raises(UserError, match="checksum mismatch"):
        external_sets.fetch(tmp_path)
    assert not path.exists() and not list(path.parent.glob("*.part"))  # nothing half-written is left


def test_cai_label_dtype_loads_the_feedback_model_in_that_precision_and_says_so(tmp_path):
    """`cai label --dtype bfloat16` labels with bf16 weights (the bench's fast path) and the report names them;
    without it the CPU default (fp32) is used and named."""
    import json

    from typer.testing import CliRunner

    from cai.cli import app

    ref = tmp_path / "ref.jsonl"
    ref.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "No, sorry.", "rejected": f"Sure: step {i}."})
                           + "\n" for i in range(3)))
    for dtype, want in (("bfloat16", "bfloat16"), ("auto", "float32")):
        report = tmp_path / f"{dtype}.json"
        res = CliRunner().invoke(app, ["label", "--reference", str(ref), "--labeler", "contrast", "--model",
                                       "tiny-random", "-k", "1", "--dtype", dtype, "--report", str(report)])
        assert res.exit_code == 0, res.output
        saved = json.loads(report.read_text())
        assert saved["precision"] == want and saved["n"] == 3 and saved["model"] == "tiny-random"
