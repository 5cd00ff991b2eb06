"""Eval-stage generation: today's path vs the new one, back to back on one loaded model, in one process.

old: what ``answer_and_judge`` did before — prompts in file order, chunks of 16, backend batch 16,
     ``model.generate`` with no loop stopping (rows that ended keep being fed pads until the batch is done).
new: prompts sorted by length, batches of ``--batch`` (one backend batch each), ``stop_loops=True``: our own
     greedy loop that drops rows that ended (EOS or a detected loop) from the batch.

Only generation is timed (the judge and Elo are timed separately, once, on the new answers, because the
refusal judge is being rewritten and Elo cost depends on answer length). Greedy answers of the two paths are
compared: an answer the new path did not end as a loop should be the same text.

    OMP_NUM_THREADS=1 python -m cai.bench.eval_speed --harmful 32 --benign 16 --max-new-tokens 96 64 --calibrate

The machine may be shared: compare the two paths only within one run (their order alternates per max_new_tokens;
one torch thread keeps a shared CPU from collapsing two-thread kernels). --calibrate times the README reference
in the same run, so that seconds can be scaled to the unshared machine (figures in docs/evaluation.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from typing import Any

REFERENCE_TPS = 137.7  # README: HFBackend.generate, 32 bundled prompts, batch 32, 64 new tokens, unshared 2-core CPU


def spread(items: list, n: int | None) -> list:
    """``n`` items spread evenly over ``items`` (all of them when n is None or too large)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[round(i * len(items) / n)] for i in range(n)]


def run_path(backend, chats: list, sampling, batch: int, *, sort: bool) -> tuple[list, float]:
    order = sorted(range(len(chats)), key=lambda i: len(chats[i][0]["content"])) if sort else list(range(len(chats)))
    out: list = [None] * len(chats)
    old = backend.batch_size
    backend.batch_size = batch
    t0 = time.perf_counter()
    try:
        for k in range(0, len(order), batch):
            part = order[k : k + batch]
            for i, g in zip(part, backend.generate([chats[i] for i in part], sampling), strict=False):
                out[i] = g
    finally:
        backend.batch_size = old
    return out, time.perf_counter() - t0


def summary(gens: list, seconds: float) -> dict[str, Any]:
    tokens = sum(g.completion_tokens for g in gens)
    reasons: dict[str, int] = {}
    for g in gens:
        reasons[g.finish_reason] = reasons.get(g.finish_reason, 0) + 1
    return {
        "prompts": len(gens),
        "seconds": round(seconds, 1),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "finish_reasons": reasons,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--harmful", type=int, default=None, help="harmful eval prompts (spread; default all 105)")
    ap.add_argument("--benign", type=int, default=None, help="benign eval prompts (spread; default all 56)")
    ap.add_argument("--max-new-tokens", type=int, nargs="+", default=[96, 64])
    ap.add_argument("--batch", type=int, default=64, help="new path: prompts per batch")
    ap.add_argument("--old-chunk", type=int, default=16)
    ap.add_argument("--skip-old", action="store_true", help="time only the new path")
    ap.add_argument("--judge", action="store_true", help="also time the refusal judge on the new answers")
    ap.add_argument("--elo", type=int, default=0, help="also time Elo judging: this many prompts × 3 pairs")
    ap.add_argument(
        "--calibrate",
        action="store_true",
        help="also time the README's reference (32 bundled prompts, batch 32, 64 tokens, greedy: 137.7 "
        "tok/s on the unshared 2-core machine) in this run, to scale figures to that machine",
    )
    ap.add_argument("--save-texts", action="store_true", help="keep every answer of both paths in --out")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import torch

    from cai.backends import SamplingParams
    from cai.backends.hf import HFBackend
    from cai.data import load_prompts

    harmful = spread(load_prompts("redteam", split="eval").prompts, args.harmful)
    benign = spread(load_prompts("benign", split="eval").prompts, args.benign)
    items = [("harmful", p) for p in harmful] + [("benign", p) for p in benign]
    chats = [[{"role": "user", "content": p.prompt}] for _, p in items]
    t0 = time.perf_counter()
    backend = HFBackend(args.model, batch_size=16)
    doc: dict[str, Any] = {
        "model": args.model,
        "load_s": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "harmful": len(harmful),
        "benign": len(benign),
        "batch": args.batch,
        "runs": {},
    }
    backend.generate(chats[:2], SamplingParams(max_new_tokens=2, temperature=0))  # warm-up
    if args.calibrate:
        from cai.bench.common import greedy, redteam_prompts

        ref = [[{"role": "user", "content": p}] for p in redteam_prompts(32)]
        backend.batch_size = 32
        t = time.perf_counter()
        n = sum(g.completion_tokens for g in backend.generate(ref, greedy(64)))
        s = time.perf_counter() - t
        backend.batch_size = 16
        doc["calibration"] = {
            "tokens": n,
            "seconds": round(s, 1),
            "tokens_per_s": round(n / s, 1),
            "reference_tokens_per_s": REFERENCE_TPS,
            "slowdown": round(REFERENCE_TPS / (n / s), 2),
        }
        print(f"calibration: {doc['calibration']} (load {os.getloadavg()[0]:.2f})", flush=True)
    answers = None
    for j, mnt in enumerate(args.max_new_tokens):
        base = SamplingParams(max_new_tokens=mnt, temperature=0.0, top_p=1.0, seed=0)
        run: dict[str, Any] = {}
        order = ["new"] if args.skip_old else ["new", "old"] if j % 2 == 0 else ["old", "new"]  # alternate: drift
        for path in order:
            if path == "new":
                new, s_new = run_path(backend, chats, dataclasses.replace(base, stop_loops=True), args.batch, sort=True)
                run["new"] = summary(new, s_new)
            else:
                old, s_old = run_path(backend, chats, base, args.old_chunk, sort=False)
                run["old"] = summary(old, s_old)
            print(f"max_new_tokens {mnt} {path}: {run[path]} (load {os.getloadavg()[0]:.2f})", flush=True)
        if not args.skip_old:
            same = [o.text == n.text for o, n in zip(old, new, strict=False) if n.finish_reason != "loop"]
            prefix = [
                o.text.startswith(n.text.rstrip()) for o, n in zip(old, new, strict=False) if n.finish_reason == "loop"
            ]
            run["speedup_wall"] = round(s_old / s_new, 2)
            run["same_text_not_loop"] = f"{sum(same)}/{len(same)}"
            run["loop_is_prefix_of_old"] = f"{sum(prefix)}/{len(prefix)}"
            from cai.evaluation.metrics import is_loop

            run["old_is_loop_where_new_stopped"] = sum(
                is_loop(o.text) for o, n in zip(old, new, strict=False) if n.finish_reason == "loop"
            )
            run["old_loops_total"] = sum(is_loop(o.text) for o in old)
            if args.save_texts:
                run["answers"] = [
                    {
                        "id": f"{s}:{p.id}",
                        "old": o.text,
                        "new": n.text,
                        "old_reason": o.finish_reason,
                        "new_reason": n.finish_reason,
                        "old_tokens": o.completion_tokens,
                        "new_tokens": n.completion_tokens,
                    }
                    for (s, p), o, n in zip(items, old, new, strict=False)
                ]
            print(
                f"max_new_tokens {mnt}: speedup {run['speedup_wall']}x, same text (not loop) "
                f"{run['same_text_not_loop']}, loop answers prefix of old {run['loop_is_prefix_of_old']}",
                flush=True,
            )
        doc["runs"][str(mnt)] = run
        answers = answers or new
    if args.judge and answers:
        from cai.evaluation.judges import get_judge

        t = time.perf_counter()
        judge = get_judge("refusal")
        judge.judge([p.prompt for _, p in items], [g.text for g in answers])
        doc["judge_s"] = round(time.perf_counter() - t, 1)
        print(f"refusal judge on {len(items)} answers (incl. fitting): {doc['judge_s']} s", flush=True)
    if args.elo and answers:
        from cai.constitution import load_constitution
        from cai.evaluation.elo import build_comparisons, judge_pairs, principle_questions

        rows = [
            {"id": f"{s}:{p.id}", "set": s, "prompt": p.prompt, "category": p.category, "response": g.text}
            for (s, p), g in zip(items, answers, strict=False)
        ]
        rows = spread(rows, args.elo)
        comps = build_comparisons({"a": rows, "b": rows, "c": rows}, principle_questions(load_constitution("harmless")))
        t = time.perf_counter()
        judge_pairs(backend, comps, progress=False)
        s = time.perf_counter() - t
        doc["elo"] = {
            "prompts": len(rows),
            "comparisons": len(comps),
            "seconds": round(s, 1),
            "seconds_per_comparison": round(s / len(comps), 3),
        }
        print(f"Elo: {doc['elo']}", flush=True)
    doc["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
    return doc


if __name__ == "__main__":
    main()
