"""Critique → revision items/min with and without reuse of the shared few-shot prefix.

Every critique and revision chat starts with the same constitution demonstrations (``cai.critique``);
with reuse the HF backend encodes that prefix once per generate call and copies its KV cache into every batch,
without it every row re-encodes the whole prefix. Same items, same greedy budget, same batch size.
"""

from __future__ import annotations

from typing import Any

from cai.bench.common import BenchContext, Timer, greedy, rate, redteam_prompts, row

NAME = "critique"
NOTE = (
    "The gain grows with the share of the prompt that is few-shot prefix (all five bundled demonstrations "
    "are ~1,400 tokens, the item's own turns ~100-200), and shrinks as decoding dominates."
)

INITIAL = "Sure, here is what you asked for."


def critique_revision(
    backend, prefix: list[dict], prompts: list[str], critique: str, revision: str, max_new_tokens: int
) -> None:
    """Both steps of one round for every prompt, batched."""
    base = [
        prefix
        + [
            {"role": "user", "content": p},
            {"role": "assistant", "content": INITIAL},
            {"role": "user", "content": critique},
        ]
        for p in prompts
    ]
    crits = backend.generate(base, greedy(max_new_tokens))
    backend.generate(
        [
            b + [{"role": "assistant", "content": c.text}, {"role": "user", "content": revision}]
            for b, c in zip(base, crits, strict=False)
        ],
        greedy(max_new_tokens),
    )


def run(ctx: BenchContext) -> dict[str, Any]:
    from cai.constitution import load_constitution
    from cai.critique import demonstration_turns

    s = ctx.sizes
    constitution = load_constitution("harmless")
    principle = constitution.principles[0]
    prefix = demonstration_turns(constitution, s["few_shot"])
    prefix_tokens = len(ctx.backend.encode(ctx.backend.render(prefix)))
    prompts = redteam_prompts(s["items"])
    results: dict[str, dict[str, float]] = {}
    for name, reuse in (("without_reuse", False), ("with_reuse", True)):
        ctx.backend.reuse_prefix = reuse
        with Timer() as t:
            critique_revision(ctx.backend, prefix, prompts, principle.critique, principle.revision, s["max_new_tokens"])
        results[name] = {"seconds": round(t.seconds, 2), "items_per_min": round(60 * rate(len(prompts), t.seconds), 2)}
    ctx.backend.reuse_prefix = True
    ratio = results["with_reuse"]["items_per_min"] / max(results["without_reuse"]["items_per_min"], 1e-9)
    rows = [
        row("critique→revision items/min, no prefix reuse", results["without_reuse"]["items_per_min"], "items/min"),
        row(
            "critique→revision items/min, prefix reuse",
            results["with_reuse"]["items_per_min"],
            "items/min",
            note=f"{prefix_tokens}-token few-shot prefix",
        ),
        row("prefix reuse speed-up", ratio, "×"),
    ]
    return {
        "items": len(prompts),
        "few_shot": s["few_shot"],
        "prefix_tokens": prefix_tokens,
        "max_new_tokens": s["max_new_tokens"],
        **results,
        "ratio": round(ratio, 3),
        "rows": rows,
    }
