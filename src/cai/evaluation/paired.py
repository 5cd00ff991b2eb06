"""Paired comparisons between checkpoints evaluated on the same prompts.

Every checkpoint of a run answers the same eval prompts, so two checkpoints are compared prompt by prompt (samples
matched by ``id``) rather than as two independent rates. For each binary outcome

- ``harmful_compliance`` on harmful prompts: verdict ``complied`` (also ``partial`` with ``count_partial``),
- ``over_refusal`` on benign prompts: verdict ``refused`` or ``partial``,
- ``unhelped`` on benign prompts: any verdict but ``complied`` (over-refusal plus non-responsive answers),

the prompts both checkpoints answered form a paired 2x2 table::

                 B yes    B no
        A yes     n11       b
        A no       c       n00

and we report n, both rates, the discordant counts b and c, **McNemar's exact test** (two-sided binomial test
of b against Bin(b + c, 1/2); p = 1 when b + c = 0) and the **paired difference rate_B − rate_A = (c − b) / n**
with a 95% confidence interval by **Newcombe's hybrid score method for paired data** (Newcombe 1998, Stat Med
17:2635–2650, method 10: Wilson score intervals for both rates combined square-and-add with the continuity-
corrected phi correlation of the pairs). ``significant`` means McNemar p < 0.05; the interval and the test are
different procedures and can disagree near the boundary (an interval just excluding 0 with p slightly above
0.05), so both are reported.

Everything here is a pure function of judged samples; ``eval/paired.json`` is written by the eval stage, the
report reads it, and the experiments call :func:`paired_comparisons` on their own checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import combinations
from pathlib import Path

from cai.evaluation.metrics import Z95, harmful_complied, over_refused, proportion_ci, unhelped

ALPHA = 0.05
METHOD = {
    "test": "McNemar exact (two-sided binomial test on the discordant pairs b vs c, p = 1/2)",
    "interval": "Newcombe hybrid score interval for paired proportions (1998, method 10), 95%",
    "difference": "rate_b - rate_a on the prompts both checkpoints answered (matched by sample id)",
    "significant": f"McNemar p < {ALPHA}",
}
OUTCOME_NAMES = {
    "harmful_compliance": "harmful compliance",
    "over_refusal": "over-refusal",
    "unhelped": "benign not helped",
}


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``b`` successes in ``b + c`` trials with p = 1/2
    (twice the smaller tail, capped at 1; the distribution is symmetric, so this equals the likelihood-ordered
    two-sided p of ``scipy.stats.binomtest``). ``p = 1`` when there are no discordant pairs."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n  # exact: integers until this division
    return min(1.0, 2.0 * tail)


def paired_difference_ci(n11: int, n10: int, n01: int, n00: int, z: float = Z95) -> tuple[float, float, float]:
    """``(difference, low, high)`` for ``p1 − p2`` of paired binary outcomes, by Newcombe's hybrid score method
    (1998, method 10), where ``p1 = (n11 + n10) / n`` is the first variable's rate, ``p2 = (n11 + n01) / n`` the
    second's, ``n10`` counts pairs with the first yes and the second no, ``n01`` the reverse.

    With Wilson intervals (l1, u1) and (l2, u2) for p1 and p2 and the continuity-corrected correlation
    phi = C / sqrt((n11+n10)(n01+n00)(n11+n01)(n10+n00)), C = n11·n00 − n10·n01 − n/2 if that product difference
    exceeds n/2, 0 if it lies in [0, n/2], itself if negative (phi = 0 when a margin is empty):
    low = D − sqrt((p1−l1)² − 2·phi·(p1−l1)(u2−p2) + (u2−p2)²),
    high = D + sqrt((p2−l2)² − 2·phi·(p2−l2)(u1−p1) + (u1−p1)²), clipped to [−1, 1]. NaNs when n = 0."""
    n = n11 + n10 + n01 + n00
    if n <= 0:
        return (math.nan, math.nan, math.nan)
    r1, r2 = n11 + n10, n11 + n01
    p1, l1, u1 = proportion_ci(r1, n, z)
    p2, l2, u2 = proportion_ci(r2, n, z)
    d = p1 - p2
    margins = r1 * (n - r1) * r2 * (n - r2)
    phi = 0.0
    if margins > 0:
        a = n11 * n00 - n10 * n01
        c = a - n / 2 if a > n / 2 else (0.0 if a >= 0 else a)
        phi = c / math.sqrt(margins)
    low = d - math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    high = d + math.sqrt(max(0.0, (p2 - l2) ** 2 - 2 * phi * (p2 - l2) * (u1 - p1) + (u1 - p1) ** 2))
    return (d, max(-1.0, low), min(1.0, high))


def paired_test(pairs: Iterable[tuple[bool, bool]], *, alpha: float = ALPHA) -> dict:
    """Paired comparison of one binary outcome: ``pairs`` holds ``(outcome of A, outcome of B)`` per prompt.

    Returns ``n, rate_a, rate_b, n11 (both), b (A only), c (B only), n00 (neither), difference (rate_b −
    rate_a), ci_low, ci_high, p_value (McNemar exact), significant (p < alpha)``; rates, difference and CI are
    NaN when n = 0 (p = 1, not significant)."""
    n11 = b = c = n00 = 0
    for x, y in pairs:
        x, y = bool(x), bool(y)
        if x and y:
            n11 += 1
        elif x:
            b += 1
        elif y:
            c += 1
        else:
            n00 += 1
    n = n11 + b + c + n00
    # the interval is for rate_b - rate_a: B is the first variable, so its "yes, other no" cell is c
    diff, lo, hi = paired_difference_ci(n11, c, b, n00)
    p = mcnemar_exact(b, c)
    return {
        "n": n,
        "rate_a": (n11 + b) / n if n else math.nan,
        "rate_b": (n11 + c) / n if n else math.nan,
        "n11": n11,
        "b": b,
        "c": c,
        "n00": n00,
        "difference": diff,
        "ci_low": lo,
        "ci_high": hi,
        "p_value": p,
        "significant": bool(n and p < alpha),
    }


def outcome_functions(count_partial: bool = False) -> dict[str, tuple[str, Callable[[dict], bool]]]:
    """outcome name -> (the prompt set it is measured on, labels -> bool)."""
    return {
        "harmful_compliance": ("harmful", lambda lab: harmful_complied(lab, count_partial=count_partial)),
        "over_refusal": ("benign", over_refused),
        "unhelped": ("benign", unhelped),
    }


def compare_samples(
    samples_a: Sequence[dict], samples_b: Sequence[dict], *, count_partial: bool = False, alpha: float = ALPHA
) -> dict[str, dict]:
    """outcome -> :func:`paired_test` on the prompts both sample lists answered (matched by ``id``), plus
    ``only_a`` / ``only_b``: how many prompts of that set only one of them answered (left out of the test).
    Samples need ``id``, ``set`` (harmful | benign) and ``labels``."""
    out = {}
    for outcome, (which, fn) in outcome_functions(count_partial).items():
        a = {s["id"]: s for s in samples_a if s.get("set") == which}
        b = {s["id"]: s for s in samples_b if s.get("set") == which}
        both = [i for i in a if i in b]
        res = paired_test([(fn(a[i]["labels"]), fn(b[i]["labels"])) for i in both], alpha=alpha)
        out[outcome] = {**res, "only_a": len(a) - len(both), "only_b": len(b) - len(both)}
    return out


def paired_comparisons(
    samples: Mapping[str, Sequence[dict]],
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
    count_partial: bool = False,
    alpha: float = ALPHA,
) -> dict:
    """Paired comparisons between checkpoints: ``samples`` maps a checkpoint label to its judged samples (an
    ``eval/<label>/samples.jsonl``); ``pairs`` defaults to every pair in the mapping's order (base vs sl,
    base vs rl, sl vs rl, …). Returns ``{"method", "count_partial", "alpha", "comparisons": [...]}`` with one
    row per (pair, outcome) that has at least one shared prompt: ``a, b, pair, outcome`` + :func:`paired_test`."""
    labels = list(samples)
    pairs = list(pairs) if pairs is not None else list(combinations(labels, 2))
    rows = []
    for a, b in pairs:
        if a not in samples or b not in samples:
            raise KeyError(f"paired comparison {a} vs {b}: no samples for {a if a not in samples else b}")
        for outcome, res in compare_samples(samples[a], samples[b], count_partial=count_partial, alpha=alpha).items():
            if res["n"]:
                # the labels as model_a / model_b: "b" is the discordant count of the McNemar test
                rows.append({"model_a": a, "model_b": b, "pair": f"{a} vs {b}", "outcome": outcome, **res})
    return {"method": METHOD, "count_partial": count_partial, "alpha": alpha, "comparisons": rows}


def write_paired(path: Path, samples: Mapping[str, Sequence[dict]], **kw) -> dict:
    """:func:`paired_comparisons` written to ``path`` (JSON); returns it."""
    from cai.runs import write_json

    result = paired_comparisons(samples, **kw)
    write_json(Path(path), result)
    return result


# ---- formatting (report, summary.md, experiment reports) ----------------------------------------------------------
TABLE_HEADER = ("pair", "outcome", "n", "rate A", "rate B", "difference B−A [95% CI]", "McNemar p", "significant")


def format_p(p: float) -> str:
    return "–" if p != p else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def format_difference(row: dict) -> str:
    """'-20.0 pp [-35.1, -4.2]' (percentage points)."""
    if row["difference"] != row["difference"]:
        return "–"
    return f"{100 * row['difference']:+.1f} pp [{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}]"


def table_rows(result: dict) -> list[list[str]]:
    """Rows under :data:`TABLE_HEADER` for a :func:`paired_comparisons` result."""
    return [
        [
            r["pair"],
            OUTCOME_NAMES.get(r["outcome"], r["outcome"]),
            str(r["n"]),
            f"{100 * r['rate_a']:.1f}%",
            f"{100 * r['rate_b']:.1f}%",
            format_difference(r),
            format_p(r["p_value"]),
            "yes" if r["significant"] else "no",
        ]
        for r in result.get("comparisons", [])
    ]
