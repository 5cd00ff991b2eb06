"""Generation: the batched backend vs the naive loop, on the same prompts and token budget.

Naive loop (what the students did): for each prompt, one ``model.generate`` call on that single sequence
(KV cache on within the call, nothing shared between calls; the full prompt is encoded every call).
Batched: ``HFBackend.generate`` (length-sorted, left-padded batches; shared-prefix KV reuse).
Utilisation = tokens/s × 2 × parameters ÷ the fp32 matmul FLOP/s measured in the same run.
bf16 weights (inference only, ``models.dtype: bfloat16``): the same batched path on a bf16 copy of the model, read
against the fp32 limit (the yardstick of every other row) and against the bf16 matmul limit of the same run.
"""

from __future__ import annotations

from typing import Any

from cai.bench.common import BenchContext, Timer, bf16_copy, greedy, rate, redteam_prompts, row

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


def _batched(backend, chats, budget: int, bs: int, *, growing: bool, progress: bool) -> dict[str, float]:
    old = (backend.batch_size, backend.growing_kv)
    backend.batch_size, backend.growing_kv = bs, growing
    try:
        with Timer() as t:
            outs = backend.generate(chats, greedy(budget), progress=progress)
    finally:
        backend.batch_size, backend.growing_kv = old
    n = sum(g.completion_tokens for g in outs)
    return {
        "prompts": len(chats),
        "tokens": n,
        "seconds": round(t.seconds, 2),
        "tokens_per_s": round(rate(n, t.seconds), 2),
    }


def int8_copy(model):
    """An int8 copy of the loaded model (models.quantize_int8, the ``dtype: int8`` path), leaving the fp32 one."""
    import copy

    from cai.models import quantize_int8

    return quantize_int8(copy.deepcopy(model))


def _on_copy(ctx: BenchContext, copy_of, chats, budget: int, batch_sizes) -> dict[str, dict[str, float]]:
    """The default batched path at each batch size on a converted copy of the model (int8, bf16)."""
    fp32_model = ctx.backend.model
    ctx.backend.model = copy_of(fp32_model)
    try:
        return {
            str(bs): _batched(
                ctx.backend, chats[: max(bs, ctx.sizes["prompts"])], budget, bs, growing=False, progress=False
            )
            for bs in batch_sizes
        }
    finally:
        ctx.backend.model = fp32_model


def run(ctx: BenchContext) -> dict[str, Any]:
    s = ctx.sizes
    n_chats = max(s["prompts"], *s["batch_sizes"])
    chats = [[{"role": "user", "content": p}] for p in redteam_prompts(n_chats)]
    budget = s["max_new_tokens"]
    with Timer() as t:
        naive_tokens = naive_loop(ctx.backend, chats[: s["naive_prompts"]], budget)
    naive = {
        "prompts": s["naive_prompts"],
        "tokens": naive_tokens,
        "seconds": round(t.seconds, 2),
        "tokens_per_s": round(rate(naive_tokens, t.seconds), 2),
    }
    # The default path (transformers' concatenating KV cache) and the opt-in growing cache, back to back per batch
    # size on the same prompts: each batch size answers as many prompts as it holds (at least `prompts` of them).
    batched: dict[str, dict[str, float]] = {}
    growing: dict[str, dict[str, float]] = {}
    for bs in s["batch_sizes"]:
        these = chats[: max(bs, s["prompts"])]
        batched[str(bs)] = _batched(ctx.backend, these, budget, bs, growing=False, progress=ctx.progress)
        growing[str(bs)] = _batched(ctx.backend, these, budget, bs, growing=True, progress=ctx.progress)
    best = max(batched, key=lambda k: batched[k]["tokens_per_s"])
    best_growing = max(growing, key=lambda k: growing[k]["tokens_per_s"])
    best_tps = batched[best]["tokens_per_s"]
    ratio = best_tps / naive["tokens_per_s"] if naive["tokens_per_s"] else 0.0

    def util(tps: float) -> float:
        return tps * 2 * ctx.params / ctx.matmul_flops

    int8: dict[str, float] = _on_copy(ctx, int8_copy, chats, budget, [int(best)])[best] if s.get("int8") else {}
    bf16 = _on_copy(ctx, bf16_copy, chats, budget, s["batch_sizes"]) if s.get("bf16") else {}
    rows = [
        row("naive loop tokens/s", naive["tokens_per_s"], "tok/s"),
        *[row(f"batched tokens/s (batch {k})", v["tokens_per_s"], "tok/s") for k, v in batched.items()],
        *[
            row(f"batched tokens/s (batch {k}), growing KV cache (opt-in)", v["tokens_per_s"], "tok/s")
            for k, v in growing.items()
        ],
        row("batched ÷ naive (best batch)", ratio, "×", 8.0, f"batch {best}"),
        row("growing ÷ default KV cache (best batch of each)", growing[best_growing]["tokens_per_s"] / best_tps, "×"),
        row("utilisation, naive loop", util(naive["tokens_per_s"]) * 100, "% of matmul"),
        row("utilisation, best batch", util(best_tps) * 100, "% of matmul", 40.0, f"batch {best}, fp32"),
        row(
            "utilisation, growing KV cache",
            util(growing[best_growing]["tokens_per_s"]) * 100,
            "% of matmul",
            note=f"batch {best_growing}, fp32",
        ),
    ]
    if int8:
        rows.append(
            row(
                "utilisation, int8 weights (inference only)",
                util(int8["tokens_per_s"]) * 100,
                "% of fp32 matmul",
                note=f"batch {best}; dynamic int8 Linear; not the eval default",
            )
        )
    if bf16:
        best_bf16 = max(bf16, key=lambda k: bf16[k]["tokens_per_s"])
        tps = bf16[best_bf16]["tokens_per_s"]
        of_bf16 = tps * 2 * ctx.params / ctx.matmul_flops_bf16 if ctx.matmul_flops_bf16 else 0.0
        rows += [
            *[
                row(f"batched tokens/s (batch {k}), bf16 weights (inference only)", v["tokens_per_s"], "tok/s")
                for k, v in bf16.items()
            ],
            row("bf16 ÷ fp32 (best batch of each)", tps / best_tps if best_tps else 0.0, "×"),
            row(
                "utilisation, bf16 weights (inference only)",
                util(tps) * 100,
                "% of fp32 matmul",
                40.0,
                f"batch {best_bf16}; {of_bf16 * 100:.1f}% of the bf16 matmul limit; answers differ from fp32 ones "
                "(docs/performance.md)",
            ),
        ]
    return {
        "naive": naive,
        "batched": batched,
        "growing_kv": growing,
        "int8": int8,
        "bf16": bf16,
        "best_batch_size": int(best),
        "ratio": round(ratio, 3),
        "utilisation": round(util(best_tps), 4),
        "utilisation_growing_kv": round(util(growing[best_growing]["tokens_per_s"]), 4),
        "max_new_tokens": budget,
        "rows": rows,
    }
