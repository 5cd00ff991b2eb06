"""The eval stage's own path (cai.evaluation.evaluate.answer_and_judge): the bundled eval split answered greedily
in length-sorted batches with loop stopping, every batch judged by the offline refusal judge and written, as
`cai run` does for one checkpoint. Its cost per generated token (generation + judging + writing) is compared
with the best batched generation of the same run (the generation benchmark's best row, same backend and
weights); the issue's target is a per-token cost within 1.5× of it, i.e. a ratio of tokens/s ≥ 0.67.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from cai.bench.common import BenchContext, Timer, rate, row

NAME = "eval"
NOTE = (
    "Eval answers are short on average (many stop at EOS or a detected loop well before the budget) and the "
    "judge's MiniLM pass is paid per answer, so its tokens/s can sit above or below pure generation: the "
    "ratio says how much of the stage's time is spent outside decoding."
)


def eval_items(harmful: int | None, benign: int | None) -> list[tuple[str, Any]]:
    """The quickstart's eval prompts: the bundled red-team and benign eval splits (first N of each)."""
    from cai.data import load_prompts

    h = load_prompts("redteam", None, split="eval", limit=harmful).prompts
    b = load_prompts("benign", None, split="eval", limit=benign).prompts
    return [("harmful", p) for p in h] + [("benign", p) for p in b]


def run(ctx: BenchContext) -> dict[str, Any]:
    from cai.backends import SamplingParams
    from cai.evaluation.evaluate import answer_and_judge
    from cai.evaluation.judges import get_judge
    from cai.runs import JsonlWriter, read_jsonl

    s = ctx.sizes
    items = eval_items(s.get("harmful"), s.get("benign"))
    judge = get_judge("refusal")
    judge.judge(["warm-up"], ["I can't help with that."])  # load the judge outside the timed span
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "samples.jsonl"
        with Timer() as t, JsonlWriter(path) as writer:
            answer_and_judge(
                ctx.backend,
                items,
                writer,
                judge,
                SamplingParams(max_new_tokens=s["max_new_tokens"], temperature=0.0, top_p=1.0, seed=0, stop_loops=True),
                batch_size=s["batch_size"],
                progress=ctx.progress,
            )
        samples = read_jsonl(path)
    tokens = sum(r["completion_tokens"] for r in samples)
    tps = rate(tokens, t.seconds)
    gen = (ctx.previous.get("generation") or {}).get("rows", [])
    # the same weights as the eval stage's: fp32 rows only (the bf16 copy's rows are another precision)
    same = [r["value"] for r in gen if r["metric"].startswith("batched tokens/s (batch") and "bf16" not in r["metric"]]
    best = max(same, default=None)
    rows = [
        row("eval stage tokens/s (generate + judge + write)", tps, "tok/s", note=f"batch {s['batch_size']}"),
        row("eval stage seconds", t.seconds, "s", note=f"{len(items)} prompts, {tokens} tokens"),
    ]
    if best:
        rows.append(
            row(
                "eval tokens/s ÷ best batched generation tokens/s",
                tps / best,
                "×",
                round(1 / 1.5, 3),
                "≥ 0.67 = per-token cost within 1.5× of the backend's best",
            )
        )
    return {
        "prompts": len(items),
        "tokens": tokens,
        "seconds": round(t.seconds, 2),
        "tokens_per_s": round(tps, 2),
        "mean_tokens": round(tokens / len(samples), 1) if samples else 0,
        "finish_reasons": {
            k: sum(r["finish_reason"] == k for r in samples) for k in {r["finish_reason"] for r in samples}
        },
        "best_generation_tokens_per_s": best,
        "rows": rows,
    }
