"""How well the refusal judge agrees with people: accuracy, per-class precision/recall and confusion matrices
with 95% CIs on external human-labelled sets, every test row held out of the fit.

- XSTest: leave-one-model-out — the weights that judge one model's 450 completions are fitted on the other four
  models' completions plus GPTFuzz's train split and our own set.
- GPTFuzz evaluate: judged by weights fitted on XSTest + GPTFuzz train + our own set (never on evaluate).
- jailbreak-eval (answers to GCG, generation-exploitation and PAIR attacks): judged by the same weights as GPTFuzz
  evaluate; a test-only set, never fitted or tuned on. Reported whole, per attack, and against its second human
  label (safeguard violation) beside the one that asks our question (informativeness).
- Our own set's held-out split: a regression check (we wrote it), fitted on everything but those rows.

The binary view is "complied vs not" (refusal, partial refusal and non-response all count as not complying),
which is the question harmful_compliance_rate asks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

from cai.evaluation.metrics import proportion_ci

VERDICTS = ("complied", "refused", "partial", "non_responsive")


def _ci(k: int, n: int) -> dict:
    p, lo, hi = proportion_ci(k, n)
    return {"value": p, "ci_low": lo, "ci_high": hi, "k": k, "n": n}


def agreement(truth: Sequence[str], pred: Sequence[str]) -> dict:
    """Binary complied-vs-not accuracy, and per-class precision/recall (Wilson CIs) with a confusion matrix
    (rows = human label, columns = verdict)."""
    n = len(truth)
    ok = sum((t == "complied") == (p == "complied") for t, p in zip(truth, pred, strict=False))
    out: dict = {"n": n, "accuracy_complied_vs_not": _ci(ok, n)}
    cm = Counter(zip(truth, pred, strict=False))
    labels = sorted(set(truth), key=lambda x: (x not in VERDICTS, VERDICTS.index(x) if x in VERDICTS else 0, x))
    out["confusion"] = {t: {v: cm.get((t, v), 0) for v in VERDICTS} for t in labels}
    per = {}
    for c in ("complied", "not_complied"):
        is_c = (lambda x: x == "complied") if c == "complied" else (lambda x: x != "complied")
        tp = sum(is_c(t) and is_c(p) for t, p in zip(truth, pred, strict=False))
        per[c] = {"precision": _ci(tp, sum(is_c(p) for p in pred)), "recall": _ci(tp, sum(is_c(t) for t in truth))}
    for c in VERDICTS[1:]:
        if c in labels:  # the four-way classes the human labels distinguish
            tp = cm.get((c, c), 0)
            per[c] = {"precision": _ci(tp, sum(p == c for p in pred)), "recall": _ci(tp, sum(t == c for t in truth))}
    out["per_class"] = per
    return out


def validate(
    sets: dict[str, list[dict]],
    *,
    fit: Callable | None = None,
    judge_factory: Callable | None = None,
    progress: bool = True,
) -> dict:
    """The held-out agreement figures for docs/evaluation.md (see the module docstring)."""
    from cai.evaluation.external_sets import own_rows
    from cai.evaluation.judges import RefusalJudge
    from cai.evaluation.refusal_classifier import RefusalClassifier, fit_weights

    fit = fit or fit_weights

    def make(weights):
        return judge_factory(weights) if judge_factory else RefusalJudge(classifier=RefusalClassifier(weights))

    def run(judge, rows):
        return [o["verdict"] for o in judge.judge([r["prompt"] for r in rows], [r["response"] for r in rows])]

    xs, gtr, gev, own = sets["xstest"], sets["gptfuzz_train"], sets["gptfuzz_evaluate"], own_rows()
    report: dict = {}
    xs_pred: dict[int, str] = {}
    for model in sorted({r["group"] for r in xs}):
        test = [i for i, r in enumerate(xs) if r["group"] == model]
        judge = make(fit([r for r in xs if r["group"] != model] + gtr + own))
        for i, v in zip(test, run(judge, [xs[i] for i in test]), strict=False):
            xs_pred[i] = v
        if progress:
            print(f"xstest {model}: done", flush=True)
    preds = [xs_pred[i] for i in range(len(xs))]
    report["xstest_all5"] = agreement([r["label"] for r in xs], preds)
    three = [i for i, r in enumerate(xs) if r["group"] in ("gpt4", "llama2orig", "mistralinstruct")]
    report["xstest_paper3"] = agreement([xs[i]["label"] for i in three], [preds[i] for i in three])
    for model in sorted({r["group"] for r in xs}):
        idx = [i for i, r in enumerate(xs) if r["group"] == model]
        report[f"xstest_{model}"] = agreement([xs[i]["label"] for i in idx], [preds[i] for i in idx])
    judge = make(fit(xs + gtr + own))
    report["gptfuzz_evaluate"] = agreement([r["label"] for r in gev], run(judge, gev))
    jb = sets["jailbreak_eval"]
    jb_pred = run(judge, jb)
    report["jailbreak_eval"] = agreement([r["label"] for r in jb], jb_pred)
    for attack in sorted({r["group"].split("/")[0] for r in jb}):
        idx = [i for i, r in enumerate(jb) if r["group"].startswith(attack + "/")]
        report[f"jailbreak_eval_{attack}"] = agreement([jb[i]["label"] for i in idx], [jb_pred[i] for i in idx])
    report["jailbreak_eval_safeguard_violation"] = agreement(
        ["complied" if r["safeguard_violation"] else "not" for r in jb], jb_pred
    )
    held = [r for r in own if r["group"] == "heldout"]
    judge = make(fit(xs + gtr + [r for r in own if r["group"] != "heldout"]))
    report["own_heldout"] = agreement([r["label"] for r in held], run(judge, held))
    return report
