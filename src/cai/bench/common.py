"""Shared pieces of the benchmarks: the machine's matmul limit, timing, prompts, the table rows."""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any

from cai.backends import SamplingParams
from cai.models import ModelSpec


@dataclass
class BenchContext:
    """What every benchmark gets: the model spec, its loaded backend, sizes, and the machine's FLOP/s."""

    spec: ModelSpec
    backend: Any  # cai.backends.hf.HFBackend
    quick: bool
    matmul_flops: float
    progress: bool = False
    sizes: dict[str, Any] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)  # results of the benchmarks run before this one
    matmul_flops_bf16: float = 0.0  # the same matmul benchmark in bf16: the yardstick of the bf16 inference rows

    @property
    def params(self) -> int:
        return count_params(self.backend.model)


def count_params(model) -> int:
    """Distinct parameters (tied embedding/lm_head counted once): forward FLOPs/token ≈ 2 × this."""
    seen, n = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n


def matmul_flops(n: int = 1024, seconds: float = 2.0, dtype: str = "float32") -> float:
    """Best FLOP/s of ``torch.matmul`` on n×n matrices of ``dtype`` (fp32 by default), in this process: the
    machine's practical limit for that precision."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n).to(dt), torch.randn(n, n).to(dt)
    torch.matmul(a, b)
    return 2 * n**3 / best_call_seconds(lambda: torch.matmul(a, b), seconds, calls_per_timing=4)


def best_call_seconds(call, seconds: float, calls_per_timing: int = 1) -> float:
    """The shortest time one ``call()`` took over repeats for ``seconds`` (each timing covers ``calls_per_timing``
    calls, averaged); inf when no repeat fit."""
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(calls_per_timing):
            call()
        best = min(best, (time.perf_counter() - t0) / calls_per_timing)
    return best


def layer_matmul_flops(
    model, dtypes: tuple[str, ...] = ("float32", "bfloat16"), tokens: int = 2048, seconds: float = 2.0
) -> dict[str, float]:
    """FLOP/s of the model's own projections (every distinct ``nn.Linear`` weight shape but the vocabulary
    head's, weighted by how often it occurs) applied to ``tokens`` rows, per dtype: the matmul speed a prefill
    pass of this model can reach at each precision on this machine (best time of each shape, ``seconds`` in all).
    One dtype after the other, not interleaved: on this AVX-512 CPU interleaving slowed the fp32 calls that followed
    bf16 ones (fp32 158-194 GFLOP/s interleaved vs 185-198 alone), which inflated the ratio."""
    from collections import Counter

    import torch

    vocab = int(getattr(model.config, "vocab_size", 0))
    shapes = Counter(
        tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.shape[0] != vocab
    )
    out = {}
    for dt in dtypes:
        flops, spent = 0.0, 0.0
        for (n_out, n_in), count in shapes.items():
            x, w = torch.randn(tokens, n_in).to(getattr(torch, dt)), torch.randn(n_out, n_in).to(getattr(torch, dt))
            for _ in range(3):  # warm-up: the first calls of a kernel run slow
                torch.nn.functional.linear(x, w)
            best = best_call_seconds(
                lambda x=x, w=w: torch.nn.functional.linear(x, w), seconds / (len(shapes) * len(dtypes))
            )
            flops += count * 2 * tokens * n_in * n_out
            spent += count * best
        out[dt] = flops / spent
    return out


class TokenCounter:
    """``with TokenCounter(model) as c: ...`` then ``c.tokens``: the input positions (pads included) of every
    forward pass of ``model`` inside the block: the work a scoring path asks of the matmuls."""

    def __init__(self, model) -> None:
        self.model, self.tokens = model, 0

    def _count(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.tokens += int(ids.numel())

    def __enter__(self) -> TokenCounter:
        self.handle = self.model.register_forward_pre_hook(self._count, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def machine() -> dict[str, Any]:
    """A description of the machine the figures were taken on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    from cai.runs import package_versions

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(mem, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
        "versions": package_versions(),
    }


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds``."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


def greedy(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0, seed=0)


def bf16_copy(model):
    """A bf16 copy of the loaded model (the ``models.dtype: bfloat16`` path), leaving the fp32 one."""
    import copy

    import torch

    return copy.deepcopy(model).to(torch.bfloat16)


def redteam_prompts(n: int) -> list[str]:
    """The first ``n`` bundled red-team prompts (the same prompts for every variant)."""
    from cai.data import load_prompts

    prompts = [p.prompt for p in load_prompts("redteam", None).prompts]
    return (prompts * (n // len(prompts) + 1))[:n]


def row(metric: str, value: float, unit: str = "", target: float | None = None, note: str = "") -> dict[str, Any]:
    """One line of the results table; ``met`` is None when there is no target."""
    return {
        "metric": metric,
        "value": round(value, 4),
        "unit": unit,
        "target": target,
        "met": None if target is None else bool(value >= target),
        "note": note,
    }


def rate(n: float, seconds: float) -> float:
    return n / seconds if seconds > 0 else 0.0
