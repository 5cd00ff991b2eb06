"""AI-feedback labels: log-prob scoring of the answer tokens vs generate-and-parse ("reply OPTION 1 or
OPTION 2"), both batched on the same backend, prompts and pairs.

Log-prob: the assistant turn is prefilled with "OPTION" and the backend scores " 1" and " 2" (one prefix pass,
shared by both options). Generate-and-parse: the model writes up to ``max_new_tokens`` greedily and the first
"OPTION 1/2" (or a bare 1/2) in its answer is taken; anything else is unparseable.
"""

from __future__ import annotations

import re
from typing import Any

from cai.bench.common import BenchContext, Timer, greedy, rate, redteam_prompts, row

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
    return {
        "pairs": len(chats),
        "logprob_seconds": round(t_lp.seconds, 2),
        "parse_seconds": round(t_gen.seconds, 2),
        "ratio": round(ratio, 3),
        "unparseable_share": round(unparseable, 4),
        "parse_max_new_tokens": s["parse_max_new_tokens"],
        "examples": [g.text[:120] for g in outs[:3]],
        "rows": rows,
    }
