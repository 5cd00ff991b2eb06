"""Generation: the batched backend vs the naive loop, on the same prompts and token budget.

Naive loop (what the students did): for each prompt, one ``model.generate`` call on that single sequence
(KV cache on within the call, nothing shared between calls; the full prompt is encoded every call).
Batched: ``HFBackend.generate`` (length-sorted, left-padded batches; shared-prefix KV reuse).
Utilisation = tokens/s × 2 × parameters ÷ the fp32 matmul FLOP/s measured in the same run.
"""

from __future__ import annotations

from typing import Any

from cai.bench.common import BenchContext, Timer, greedy, rate, redteam_prompts, row

NAME = "generation"
NOTE = (
    "Decoding one sequence re-reads every weight per token, so the naive loop is memory-bound; batches "
    "amortise that read. Utilisation stays far below the matmul limit on CPU because each decode step is a "
    "thin (batch × hidden) matmul plus per-layer Python/kernel overhead, and attention over the KV cache and "
    "sampling are not counted as useful FLOPs."
)


def naive_loop(backend, chats: list[list[dict]], max_new_tokens: int) -> int:
    """One prompt at a time, full prompt each call; returns the number of generated tokens."""
    import torch

    tok, model, total = backend.tokenizer, backend.model, 0
    for chat in chats:
        enc = tok(backend.render(chat), return_tensors="pt", add_special_tokens=False).to(backend.device)
        with torch.inference_mode():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=tok.pad_token_id,
            )
        total += int(out.shape[1] - enc["input_ids"].shape[1])
    return total


def run(ctx: BenchContext) -> dict[str, Any]:
    s = ctx.sizes
    chats = [[{"role": "user", "content": p}] for p in redteam_prompts(s["prompts"])]
    budget = s["max_new_tokens"]
    with Timer() as t:
        naive_tokens = naive_loop(ctx.backend, chats[: s["naive_prompts"]], budget)
    naive = {
        "prompts": s["naive_prompts"],
        "tokens": naive_tokens,
        "seconds": round(t.seconds, 2),
        "tokens_per_s": round(rate(naive_tokens, t.seconds), 2),
    }
    batched: dict[str, dict[str, float]] = {}
    old = ctx.backend.batch_size
    try:
        for bs in s["batch_sizes"]:
            ctx.backend.batch_size = bs
            with Timer() as t:
                outs = ctx.backend.generate(chats, greedy(budget), progress=ctx.progress)
            n = sum(g.completion_tokens for g in outs)
            batched[str(bs)] = {
                "prompts": len(chats),
                "tokens": n,
                "seconds": round(t.seconds, 2),
                "tokens_per_s": round(rate(n, t.seconds), 2),
            }
    finally:
        ctx.backend.batch_size = old
    best = max(batched, key=lambda k: batched[k]["tokens_per_s"])
    best_tps = batched[best]["tokens_per_s"]
    ratio = best_tps / naive["tokens_per_s"] if naive["tokens_per_s"] else 0.0
    util = best_tps * 2 * ctx.params / ctx.matmul_flops
    naive_util = naive["tokens_per_s"] * 2 * ctx.params / ctx.matmul_flops
    rows = [
        row("naive loop tokens/s", naive["tokens_per_s"], "tok/s"),
        *[row(f"batched tokens/s (batch {k})", v["tokens_per_s"], "tok/s") for k, v in batched.items()],
        row("batched ÷ naive (best batch)", ratio, "×", 8.0, f"batch {best}"),
        row("utilisation, naive loop", naive_util * 100, "% of matmul"),
        row("utilisation, best batch", util * 100, "% of matmul", 50.0, f"batch {best}"),
    ]
    return {
        "naive": naive,
        "batched": batched,
        "best_batch_size": int(best),
        "ratio": round(ratio, 3),
        "utilisation": round(util, 4),
        "max_new_tokens": budget,
        "rows": rows,
    }
