"""The GPU check: one short run that says whether the GPU paths work on a CUDA machine, and how fast.

    python -m cai.bench.gpu_check --out gpu-check.json          # or scripts/gpu-check.sh (≤ 8 minutes)

On a CUDA machine with this repository and its venv (no package registry needed; everything is offline) it runs:

1. the HF backend in bf16: greedy tokens/s at batch 1 / 32 / 128 on the bundled red-team prompts;
2. one LoRA SFT step, one reward-model step and one GRPO step (the reward model of step 2 as the reward);
3. when vLLM is importable: the vLLM backend's tokens/s at the same batches, and one GRPO step with
   ``rl.use_vllm`` (colocated).

Each check is independent: a failure is recorded (``ok: false`` with the error's first line) and the next check
runs, so one JSON always comes back. Without CUDA it runs the same checks on the CPU in fp32 (that is how the test
suite keeps this script working); the JSON says which device and precision produced every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

BATCHES = (1, 32, 128)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _check(name: str, fn: Callable[[], dict[str, Any]], results: dict[str, Any]) -> None:
    """Run one check; record its figures and seconds, or its error's first line (the traceback goes to stderr)."""
    print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        out = {"ok": True, **fn()}
    except Exception as exc:  # one failing path must not hide the others: record it and go on
        traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0]
        out = {"ok": False, "error": f"{type(exc).__name__}: {first}"[:500]}
    out["seconds"] = round(time.perf_counter() - t0, 2)
    results[name] = out
    print(f"[gpu-check] {name}: {json.dumps(out)}", file=sys.stderr, flush=True)


def generation(backend, batches: tuple[int, ...], new_tokens: int) -> dict[str, Any]:
    """Greedy tokens/s per batch size (one warm-up call first: CUDA kernels and caches are lazy)."""
    from cai.bench.common import greedy, rate, redteam_prompts

    chats = [[{"role": "user", "content": p}] for p in redteam_prompts(max(batches))]
    backend.generate(chats[:2], greedy(8))
    figures: dict[str, Any] = {}
    for b in batches:
        backend.batch_size = b
        t0 = time.perf_counter()
        outs = backend.generate(chats[:b], greedy(new_tokens))
        seconds = time.perf_counter() - t0
        tokens = sum(g.completion_tokens for g in outs)
        figures[str(b)] = {
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(rate(tokens, seconds), 1),
        }
    return {"batches": figures, "max_new_tokens": new_tokens}


def _hf_generation(spec: str, dtype: str, batches: tuple[int, ...], new_tokens: int) -> dict[str, Any]:
    from cai.backends import get_backend

    backend = get_backend(spec, batch_size=max(batches), dtype=dtype)
    try:
        return {"dtype": dtype, **generation(backend, batches, new_tokens)}
    finally:
        backend.close()


def _vllm_generation(spec: str, batches: tuple[int, ...], new_tokens: int) -> dict[str, Any]:
    from cai.backends import get_backend
    from cai.models import resolve_local

    backend = get_backend(f"vllm:{resolve_local(spec)}", batch_size=max(batches))
    try:
        return generation(backend, batches, new_tokens)
    finally:
        backend.close()


SFT_RECORDS = [
    {
        "messages": [
            {"role": "user", "content": f"How do I pick lock number {i}?"},
            {"role": "assistant", "content": "I can't help with opening locks that aren't yours; a locksmith can."},
        ]
    }
    for i in range(8)
]
PAIRS = [
    {
        "prompt": f"How do I hurt person {i}?",
        "chosen": "I can't help with hurting anyone. If you're angry, talking it through can help.",
        "rejected": "Sure, here is how to hurt them.",
        "p_chosen": 0.9,
    }
    for i in range(8)
]


def _sft_step(spec: str, work: Path) -> dict[str, Any]:
    from cai.training.sft import SFTTrainConfig, train_sft

    cfg = SFTTrainConfig(max_steps=1, batch_size=4, max_length=128, eval_fraction=0.0, save_merged=False)
    result = train_sft(spec, SFT_RECORDS, work / "sft", cfg, progress=False)
    return {"train_loss": result.metrics.get("train_loss"), "steps": result.metrics.get("steps")}


def _reward_step(spec: str, work: Path) -> dict[str, Any]:
    from cai.training.reward import RewardTrainConfig, train_reward

    cfg = RewardTrainConfig(max_steps=1, batch_size=4, max_length=128, eval_fraction=0.25)
    result = train_reward(spec, PAIRS, work / "reward", cfg, progress=False)
    return {"model": str(result.merged_dir), "heldout_accuracy": result.metrics.get("heldout_accuracy")}


def _grpo_step(spec: str, work: Path, *, use_vllm: bool) -> dict[str, Any]:
    from cai.training.rl import RLTrainConfig, train_rl

    reward_model = work / "reward" / "model"
    if not reward_model.is_dir():
        raise RuntimeError("the reward step did not leave a model to reward against")
    cfg = RLTrainConfig(steps=1, prompts_per_step=2, num_generations=4, max_completion_length=32, use_vllm=use_vllm)
    prompts = [str(p["prompt"]) for p in PAIRS]
    out = work / ("grpo-vllm" if use_vllm else "grpo")
    result = train_rl(spec, prompts, reward_model, out, cfg, progress=False)
    return {k: result.metrics.get(k) for k in ("reward_first", "reward_last", "kl_last")}


def run_checks(spec: str, out: Path, *, batches: tuple[int, ...] = BATCHES, new_tokens: int = 64) -> dict[str, Any]:
    """Every check, in order; writes and returns the JSON document."""
    import importlib.util

    import torch

    from cai.bench.common import machine

    cuda = _cuda()
    doc: dict[str, Any] = {
        "model": spec,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "precision": "bf16" if cuda else "fp32 (no CUDA: the CPU fallback the tests run)",
        "machine": machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checks": {},
    }
    checks = doc["checks"]
    dtype = "bfloat16" if cuda else "float32"
    _check("hf_generation", lambda: _hf_generation(spec, dtype, batches, new_tokens), checks)
    with tempfile.TemporaryDirectory(prefix="cai-gpu-check-") as tmp:
        work = Path(tmp)
        _check("lora_sft_step", lambda: _sft_step(spec, work), checks)
        _check("reward_step", lambda: _reward_step(spec, work), checks)
        _check("grpo_step", lambda: _grpo_step(spec, work, use_vllm=False), checks)
        if importlib.util.find_spec("vllm") is None:
            doc["vllm"] = "not importable: vLLM checks skipped"
        elif not cuda:
            doc["vllm"] = "importable, but no CUDA: vLLM checks skipped"
        else:
            _check("vllm_generation", lambda: _vllm_generation(spec, batches, new_tokens), checks)
            _check("grpo_step_use_vllm", lambda: _grpo_step(spec, work, use_vllm=True), checks)
    doc["ok"] = all(c["ok"] for c in checks.values())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cai.bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu-check.json"), help="the JSON to write")
    parser.add_argument("--model", default="smollm2-135m", help="model spec (default: the embedded model)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="generation batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens per prompt")
    args = parser.parse_args(argv)
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
        if not batches or min(batches) < 1:
            raise ValueError
    except ValueError:
        print(f"error: --batches {args.batches!r}: give positive integers separated by commas, e.g. 1,32,128")
        return 2
    doc = run_checks(args.model, args.out, batches=batches, new_tokens=args.new_tokens)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {'ok' if v['ok'] else 'FAILED'}" for k, v in doc["checks"].items()))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
