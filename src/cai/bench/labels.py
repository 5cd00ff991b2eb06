"""AI-feedback labels: log-prob scoring of the answer tokens vs generate-and-parse ("reply OPTION 1 or
OPTION 2"), both batched on the same backend, prompts and pairs.

Log-prob: the assistant turn is prefilled with "OPTION" and the backend scores " 1" and " 2" (one prefix pass,
shared by both options). Generate-and-parse: the model writes up to ``max_new_tokens`` greedily and the first
"OPTION 1/2" (or a bare 1/2) in its answer is taken; anything else is unparseable.

The labellers themselves (``cai.labeling``, the quickstart's settings: one principle per pair, both orders) on
pairs of sampled answers to the bundled red-team prompts: today's path (fp32 weights, every prefix encoded in
full) vs the fast path (bf16 weights; the backend encodes once the token prefix all prompts share, and the stem
that several prompts share: one pair's two orders, one context's two responses). Both label the same pairs, so the
bench also reports how far the bf16 labels move from the fp32 ones.
"""

from __future__ import annotations

import re
from typing import Any

from cai.bench.common import (
    BenchContext,
    Timer,
    TokenCounter,
    bf16_copy,
    greedy,
    layer_matmul_flops,
    rate,
    redteam_prompts,
    row,
)

NAME = "labels"
NOTE = (
    "Both methods pay the same prompt prefill (two responses plus the question, a few hundred tokens); "
    "log-probs save only the decode steps, so the pairs/s ratio is bounded by (prefill + decode) ÷ prefill "
    "and the 10× target is out of reach when prompts are long and decoding is batched. The decisive gain "
    "is validity: every log-prob label is usable, while small models often answer off-format."
)

RESPONSES = (
    "I can't help with that. If you are in danger, please contact local emergency services.",
    "Sure! Here is a detailed step-by-step answer to your question, with everything you need to know.",
)
_PARSE = re.compile(r"OPTION\s*([12])|\b([12])\b", re.IGNORECASE)


def option_chat(prompt: str, first: str, second: str) -> list[dict]:
    """The students' feedback prompt: pick OPTION 1 or OPTION 2."""
    body = (
        f"Consider this conversation.\n\nHuman: {prompt}\n\nWhich response is less harmful and more "
        f"ethical?\nOPTION 1: {first}\nOPTION 2: {second}\n\nReply OPTION 1 or OPTION 2."
    )
    return [{"role": "user", "content": body}]


def parse_option(text: str) -> int | None:
    """1 or 2 from a free-text answer, or None when it names neither."""
    m = _PARSE.search(text)
    return int(m.group(1) or m.group(2)) if m else None


def sampled_pairs(backend, n: int, max_new_tokens: int) -> list:
    """``n`` pairs of two sampled answers to the bundled red-team prompts (what the preferences stage labels)."""
    from cai.backends import SamplingParams
    from cai.labeling import Pair

    prompts = redteam_prompts(n)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.7, seed=0)
    outs = backend.generate([[{"role": "user", "content": p}] for p in prompts for _ in range(2)], sampling)
    return [Pair(id=f"bench-{i}", prompt=p, a=outs[2 * i].text, b=outs[2 * i + 1].text) for i, p in enumerate(prompts)]


def _timed_labels(backend, pairs, constitution, labeler: str, fast_model=None) -> tuple[float, list[float], int]:
    """(seconds, P(a better) per pair, token positions fed to the model) of one labeller: today's path (the
    backend's fp32 model, every prefix encoded in full), or with ``fast_model`` (a bf16 copy) the fast path, which
    also reuses shared prefixes and stems."""
    from cai.labeling import LabelConfig, label_pairs

    settings = LabelConfig(labeler=labeler, principles_per_pair=1, contrast_wording="revision")
    fp32_model, reuse = backend.model, backend.reuse_prefix
    backend.model, backend.reuse_prefix = fast_model or fp32_model, fast_model is not None
    try:
        with TokenCounter(backend.model) as fed, Timer() as t:
            labels = label_pairs(backend, pairs, constitution, settings)
    finally:
        backend.model, backend.reuse_prefix = fp32_model, reuse
    return t.seconds, [lab.p_a for lab in labels], fed.tokens


def labeller_rows(ctx: BenchContext, pairs) -> tuple[list[dict], dict[str, Any]]:
    """Today's path vs the fast path for the (A)/(B) and contrast labellers, and the rules labeller's rate."""
    from cai.constitution import load_constitution
    from cai.labeling import LabelConfig, label_pairs

    harmless = load_constitution("harmless")
    bf16 = bf16_copy(ctx.backend.model)
    # what bf16 buys the matmuls: the model's own projections at prefill size, fp32 vs bf16, on this machine
    speed = layer_matmul_flops(ctx.backend.model, ("float32", "bfloat16"))
    matmul_gain = speed["bfloat16"] / speed["float32"]
    rows, doc = [], {}
    # (A)/(B): the instructions every prompt shares are encoded once per call, and a pair's conversation and
    # principle (before the options) once for both orders; contrast: its rows share no call-wide prefix (each starts
    # with its own principle's system message), but each context is encoded once for the pair's two responses
    for labeler, name, fast in (
        ("choice", "(A)/(B) labeller", "bf16 + shared prefix + per-pair stems"),
        ("contrast", "contrast labeller", "bf16 + per-context stems"),
    ):
        t_old, p_old, fed_old = _timed_labels(ctx.backend, pairs, harmless, labeler)
        t_new, p_new, fed_new = _timed_labels(ctx.backend, pairs, harmless, labeler, fast_model=bf16)
        old, new = rate(len(pairs), t_old), rate(len(pairs), t_new)
        # fewer tokens × faster matmuls: the speed-up the fast path would show if all its time scaled like the
        # matmuls (they take 78-85% of today's path and 69-73% of the fast path under torch.profiler on the 2-core
        # CPU; attention, the largest rest, gains less from bf16): the measured ratio has stayed below it
        matmul_bound = fed_old / fed_new * matmul_gain if fed_new else 0.0
        moved = [abs(a - b) for a, b in zip(p_old, p_new, strict=True)]
        same = sum((a > 0.5) == (b > 0.5) for a, b in zip(p_old, p_new, strict=True))
        doc[labeler] = {
            "today_pairs_per_s": round(old, 3),
            "fast_pairs_per_s": round(new, 3),
            "mean_abs_change": round(sum(moved) / len(moved), 4),
            "max_abs_change": round(max(moved), 4),
            "same_side": same,
            "tokens_fed_today": fed_old,
            "tokens_fed_fast": fed_new,
            "bf16_over_fp32_layer_matmul": round(matmul_gain, 3),
            "matmul_bound": round(matmul_bound, 3),
        }
        rows += [
            row(
                f"{name} pairs/s, today's path (fp32)",
                old,
                "pairs/s",
                note="1 principle per pair, both orders" if labeler == "choice" else "1 principle per pair",
            ),
            row(f"{name} pairs/s, {fast}", new, "pairs/s"),
            row(
                f"{name}: fast ÷ today",
                new / old if old else 0.0,
                "×",
                3.0,
                f"bf16 vs fp32 labels: mean change of p {doc[labeler]['mean_abs_change']:.3f}, same side of 0.5 on "
                f"{same}/{len(pairs)}",
            ),
            row(
                f"{name}: fast ÷ today if the matmuls set the pace",
                matmul_bound,
                "×",
                note=f"token positions fed {fed_old} → {fed_new} ({fed_old / max(fed_new, 1):.2f}× fewer) × bf16 ÷ "
                f"fp32 speed of the model's projections ({matmul_gain:.2f}×)",
            ),
        ]
    rules = LabelConfig(labeler="rules")
    label_pairs(None, pairs[:1], harmless, rules)  # loads the judge's encoder and weights, once per process
    with Timer() as t:
        label_pairs(None, pairs, harmless, rules)
    doc["rules"] = {"pairs_per_s": round(rate(len(pairs), t.seconds), 3)}
    rows.append(
        row(
            "rules labeller pairs/s",
            rate(len(pairs), t.seconds),
            "pairs/s",
            note="no model: the refusal judge's MiniLM + request-harm classifier; not sped up",
        )
    )
    return rows, doc


def run(ctx: BenchContext) -> dict[str, Any]:
    s = ctx.sizes
    chats = [option_chat(p, *RESPONSES) for p in redteam_prompts(s["pairs"])]
    prefilled = [c + [{"role": "assistant", "content": "OPTION"}] for c in chats]
    with Timer() as t_lp:
        ctx.backend.logprobs(prefilled, [[" 1", " 2"]] * len(chats))
    with Timer() as t_gen:
        outs = ctx.backend.generate(chats, greedy(s["parse_max_new_tokens"]), progress=ctx.progress)
    parsed = [parse_option(g.text) for g in outs]
    unparseable = sum(p is None for p in parsed) / len(parsed)
    lp_rate, gen_rate = rate(len(chats), t_lp.seconds), rate(len(chats), t_gen.seconds)
    ratio = lp_rate / gen_rate if gen_rate else 0.0
    rows = [
        row("log-prob labels pairs/s", lp_rate, "pairs/s"),
        row("generate-and-parse pairs/s", gen_rate, "pairs/s", note=f"{s['parse_max_new_tokens']} new tokens"),
        row("log-prob ÷ generate-and-parse", ratio, "×", 10.0),
        row("generate-and-parse unparseable", unparseable * 100, "% of pairs", note="log-prob: 0%"),
    ]
    labellers: dict[str, Any] = {}
    if s.get("labeller_pairs"):
        pairs = sampled_pairs(ctx.backend, s["labeller_pairs"], s["answer_tokens"])
        more, labellers = labeller_rows(ctx, pairs)
        rows += more
    return {
        "pairs": len(chats),
        "logprob_seconds": round(t_lp.seconds, 2),
        "parse_seconds": round(t_gen.seconds, 2),
        "ratio": round(ratio, 3),
        "unparseable_share": round(unparseable, 4),
        "parse_max_new_tokens": s["parse_max_new_tokens"],
        "examples": [g.text[:120] for g in outs[:3]],
        "labellers": labellers,
        "labeller_pairs": s.get("labeller_pairs", 0),
        "rows": rows,
    }
