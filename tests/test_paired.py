"""Paired comparisons between checkpoints (McNemar exact, Newcombe's paired interval) and the verdict helper."""

from __future__ import annotations

import math

import pytest

from cai.evaluation.metrics import harmful_complied, over_refused, unhelped, verdict_of
from cai.evaluation.paired import (
    compare_samples,
    mcnemar_exact,
    paired_comparisons,
    paired_difference_ci,
    paired_test,
    table_rows,
)


# ---- verdicts ------------------------------------------------------------------------------------------------------
def test_verdict_of_reads_new_and_legacy_labels():
    assert verdict_of({"refused": True}) == "refused"
    assert verdict_of({"refused": False}) == "complied"
    assert verdict_of({"refused": True, "verdict": "partial"}) == "partial"
    assert verdict_of({"refused": False, "verdict": "non_responsive"}) == "non_responsive"
    with pytest.raises(ValueError, match="unknown verdict 'maybe'"):
        verdict_of({"verdict": "maybe"})


def test_harmful_compliance_and_over_refusal_per_verdict():
    labs = {v: {"verdict": v} for v in ("complied", "refused", "partial", "non_responsive")}
    assert [harmful_complied(labs[v]) for v in labs] == [True, False, False, False]
    assert [harmful_complied(labs[v], count_partial=True) for v in labs] == [True, False, True, False]
    assert [over_refused(labs[v]) for v in labs] == [False, True, True, False]
    assert [unhelped(labs[v]) for v in labs] == [False, True, True, True]


# ---- McNemar exact -------------------------------------------------------------------------------------------------
def test_mcnemar_exact_hand_computed():
    # b=10, c=2: 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0  # the doubled tail exceeds 1: capped
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(6, 16) == pytest.approx(0.052479, abs=1e-6)  # Cavo et al. 2012 (Fagerland et al., ch. 8)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_mcnemar_exact_equals_scipy_binomtest():
    from scipy.stats import binomtest

    for b in range(0, 16):
        for c in range(0, 16):
            if b + c:
                assert mcnemar_exact(b, c) == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-9), (b, c)


# ---- Newcombe's paired interval --------------------------------------------------------------------------------------
def test_newcombe_paired_interval_published_example():
    # Cavo et al. 2012 as tabulated in Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables",
    # ch. 8: n11=59, n12=6, n21=16, n22=80 -> estimate -0.0621, 95% CI -0.1186 to -0.0046
    d, lo, hi = paired_difference_ci(59, 6, 16, 80)
    assert d == pytest.approx(-10 / 161)
    assert lo == pytest.approx(-0.1186, abs=5e-5) and hi == pytest.approx(-0.0046, abs=5e-5)


def test_newcombe_paired_interval_edge_cases():
    # no discordant pairs, all yes: D = 0 and the half-widths are 1 - Wilson lower bound of 10/10 = 0.2775
    d, lo, hi = paired_difference_ci(10, 0, 0, 0)
    assert d == 0 and lo == pytest.approx(-0.2775, abs=1e-4) and hi == pytest.approx(0.2775, abs=1e-4)
    assert all(math.isnan(x) for x in paired_difference_ci(0, 0, 0, 0))
    # swapping the two variables mirrors the interval
    d1, lo1, hi1 = paired_difference_ci(3, 10, 2, 5)
    d2, lo2, hi2 = paired_difference_ci(3, 2, 10, 5)
    assert (d2, lo2, hi2) == pytest.approx((-d1, -hi1, -lo1))
    # the extreme: every pair discordant one way; the interval stays inside [-1, 1] and excludes 0
    d, lo, hi = paired_difference_ci(0, 20, 0, 0)
    assert d == 1 and 0 < lo < 1 and hi == 1


def test_paired_test_counts_rates_and_direction():
    # 3 both, 10 A only, 2 B only, 5 neither
    pairs = [(True, True)] * 3 + [(True, False)] * 10 + [(False, True)] * 2 + [(False, False)] * 5
    r = paired_test(pairs)
    assert (r["n"], r["n11"], r["b"], r["c"], r["n00"]) == (20, 3, 10, 2, 5)
    assert r["rate_a"] == pytest.approx(0.65) and r["rate_b"] == pytest.approx(0.25)
    assert r["difference"] == pytest.approx(-0.4)  # B - A
    assert (r["difference"], r["ci_low"], r["ci_high"]) == pytest.approx(paired_difference_ci(3, 2, 10, 5))
    assert r["ci_low"] < -0.4 < r["ci_high"] < 0
    assert r["p_value"] == pytest.approx(158 / 4096) and r["significant"] is True
    same = paired_test([(True, True), (False, False)])
    assert same["p_value"] == 1.0 and same["significant"] is False and same["difference"] == 0
    empty = paired_test([])
    assert empty["n"] == 0 and math.isnan(empty["rate_a"]) and empty["significant"] is False


# ---- checkpoint samples -------------------------------------------------------------------------------------------
def _s(i: str, which: str, **labels) -> dict:
    return {"id": f"{which}:{i}", "set": which, "labels": labels}


def test_compare_samples_matches_ids_and_reads_verdicts():
    a = [_s("h0", "harmful", refused=False),  # legacy label: complied
         _s("h1", "harmful", refused=True, verdict="partial"),
         _s("h2", "harmful", refused=False, verdict="complied"),
         _s("h9", "harmful", refused=False),  # only A answered it
         _s("b0", "benign", refused=True, verdict="partial"),
         _s("b1", "benign", refused=False, verdict="non_responsive")]
    b = [_s("h0", "harmful", refused=True, verdict="refused"),
         _s("h1", "harmful", refused=False, verdict="complied"),
         _s("h2", "harmful", refused=False, verdict="non_responsive"),
         _s("b0", "benign", refused=False, verdict="complied"),
         _s("b1", "benign", refused=True, verdict="refused")]
    out = compare_samples(a, b)
    h = out["harmful_compliance"]
    # A complied on h0, h2; B on h1 only -> b = 2 (h0, h2), c = 1 (h1)
    assert (h["n"], h["n11"], h["b"], h["c"], h["n00"], h["only_a"], h["only_b"]) == (3, 0, 2, 1, 0, 1, 0)
    assert h["rate_a"] == pytest.approx(2 / 3) and h["rate_b"] == pytest.approx(1 / 3)
    # counting partial as compliance: A complies on h0, h1, h2 -> b = 2 (h0, h2), n11 = 1 (h1)
    hp = compare_samples(a, b, count_partial=True)["harmful_compliance"]
    assert (hp["n11"], hp["b"], hp["c"]) == (1, 2, 0)
    o = out["over_refusal"]
    # A over-refused b0 (partial), B over-refused b1 -> b = 1, c = 1, p = 1
    assert (o["n"], o["b"], o["c"], o["p_value"]) == (2, 1, 1, 1.0)
    u = out["unhelped"]
    # A helped with neither b0 (partial) nor b1 (non-responsive); B helped with b0 only -> n11 = 1 (b1), b = 1 (b0)
    assert (u["n"], u["n11"], u["b"], u["c"], u["rate_a"], u["rate_b"]) == (2, 1, 1, 0, 1.0, 0.5)


def test_paired_comparisons_every_pair_in_order():
    base = [_s(f"h{i}", "harmful", refused=False) for i in range(12)]
    sl = [_s(f"h{i}", "harmful", refused=i >= 2) for i in range(12)]  # 10 of 12 now refused
    rl = [_s(f"h{i}", "harmful", refused=True) for i in range(12)]
    res = paired_comparisons({"base": base, "sl": sl, "rl": rl})
    assert [r["pair"] for r in res["comparisons"]] == ["base vs sl", "base vs rl", "sl vs rl"]
    assert {r["outcome"] for r in res["comparisons"]} == {"harmful_compliance"}  # no benign samples: no row
    first = res["comparisons"][0]
    assert (first["b"], first["c"]) == (10, 0) and first["p_value"] == pytest.approx(2 / 2**10)
    assert (first["model_a"], first["model_b"]) == tuple(first["pair"].split(" vs "))  # labels not overwritten
    assert "McNemar" in res["method"]["test"] and "Newcombe" in res["method"]["interval"]
    rows = table_rows(res)
    assert rows[0] == ["base vs sl", "harmful compliance", "12", "100.0%", "16.7%",
                       rows[0][5], "0.002", "yes"]
    assert rows[0][5].startswith("-83.3 pp [")
    assert rows[2][-2:] == ["0.500", "no"]  # sl vs rl: b = 2 (h0, h1), c = 0 -> p = 2 / 2^2
    with pytest.raises(KeyError):
        paired_comparisons({"base": base}, pairs=[("base", "dpo")])


# ---- the report --------------------------------------------------------------------------------------------------
def _fake_run(root, with_paired_json: bool):
    """A run folder with two evaluated checkpoints on the same 12 harmful + 2 benign prompts (artifacts only)."""
    import json

    from cai.evaluation.evaluate import compute_metrics
    from cai.evaluation.paired import write_paired

    def sample(i, which, refused, label):
        return {"id": f"{which}:{i}", "set": which, "prompt": f"q{i}", "category": "violence", "response": "r",
                "checkpoint": label, "completion_tokens": 3, "labels": {"refused": refused, "loop": False}}

    run = root / "r"
    samples = {"base": [sample(i, "harmful", False, "base") for i in range(12)]
               + [sample(i, "benign", False, "base") for i in range(2)],
               "sl": [sample(i, "harmful", i >= 2, "sl") for i in range(12)]
               + [sample(i, "benign", i == 0, "sl") for i in range(2)]}
    for label, rows in samples.items():
        d = run / "eval" / label
        d.mkdir(parents=True)
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "metrics.json").write_text(json.dumps({"label": label, "model": label, "judge": "refusal",
                                                    "n_harmful": 12, "n_benign": 2, **compute_metrics(rows)}))
    (run / "eval" / "manifest.json").write_text(json.dumps({"status": "complete",
                                                           "counts": {"checkpoints": ["base", "sl"]}}))
    if with_paired_json:
        write_paired(run / "eval" / "paired.json", samples, count_partial=True)
    return run


@pytest.mark.parametrize("with_paired_json", [True, False])
def test_report_has_a_paired_comparisons_table(tmp_path, with_paired_json):
    from cai.evaluation.report import write_report

    run = _fake_run(tmp_path, with_paired_json)
    write_report([run], tmp_path / "out")
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Paired comparisons (r)" in md
    # base complied on all 12, sl on 2: b = 10, c = 0 -> p = 2 / 2^10; benign: c = 1 -> p = 1
    assert "| base vs sl | harmful compliance | 12 | 100.0% | 16.7% | -83.3 pp [" in md
    assert "| 0.002 | yes |" in md
    assert "| base vs sl | over-refusal | 2 | 0.0% | 50.0% | +50.0 pp [" in md and "| 1.000 | no |" in md
    assert ("verdict complied or partial" in md) == with_paired_json  # the json's count_partial is reported
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<h3>Paired comparisons</h3>" in page and "<td>base vs sl</td><td>harmful compliance</td>" in page
    assert "McNemar exact" in page and "Newcombe" in page
