"""Run the benchmarks side by side on one model and write JSON + a Markdown report."""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cai.bench.common import BenchContext, machine, matmul_flops
from cai.models import ModelSpec, as_spec

BENCHMARKS = ("generation", "eval", "labels", "critique", "sft")  # eval reads generation's best row

# Sizes per mode. "quick" keeps `cai bench --quick` under 3 minutes on a 2-core CPU with the 135M model.
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "generation": {
            "prompts": 32,
            "naive_prompts": 8,
            "max_new_tokens": 64,
            "batch_sizes": [32, 64, 128],
            "int8": True,
            "bf16": True,
        },
        "eval": {"harmful": None, "benign": None, "max_new_tokens": 64, "batch_size": 64},  # the quickstart's eval
        "labels": {"pairs": 16, "parse_max_new_tokens": 24, "labeller_pairs": 32, "answer_tokens": 48},
        "critique": {"items": 8, "few_shot": 2, "max_new_tokens": 32},
        "sft": {"records": 32, "batch_size": 8},
    },
    "quick": {
        "generation": {"prompts": 8, "naive_prompts": 2, "max_new_tokens": 16, "batch_sizes": [8], "bf16": True},
        "eval": {"harmful": 8, "benign": 4, "max_new_tokens": 16, "batch_size": 8},
        "labels": {"pairs": 4, "parse_max_new_tokens": 12, "labeller_pairs": 4, "answer_tokens": 12},
        "critique": {"items": 4, "few_shot": 1, "max_new_tokens": 12},
        "sft": {"records": 8, "batch_size": 4},
    },
}


def run_benchmarks(
    spec: str | ModelSpec = "smollm2-135m",
    *,
    quick: bool = False,
    only: list[str] | None = None,
    progress: bool = False,
    on_result: Callable[[str, dict], None] | None = None,
) -> dict[str, Any]:
    """Run the selected benchmarks (all by default) and return the results document; ``on_result(name, doc)``
    is called after each benchmark with the document so far."""
    from cai.backends.hf import HFBackend

    spec = as_spec(spec)  # parsed once: the backend and the SFT benchmark's loads take it as is
    load_start = os.getloadavg()
    t0 = time.time()
    flops = matmul_flops(seconds=1.0 if quick else 3.0)
    # bf16 inference rows are read against both limits: on a CPU with native bf16 (AVX512-BF16, AMX) it is ~2x fp32
    flops_bf16 = matmul_flops(seconds=1.0 if quick else 3.0, dtype="bfloat16")
    backend = HFBackend(spec, batch_size=16, dtype="float32")
    mode = "quick" if quick else "full"
    doc: dict[str, Any] = {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": spec.raw,
        "quick": quick,
        "machine": machine(),
        "matmul_gflops": round(flops / 1e9, 2),
        "matmul_gflops_bf16": round(flops_bf16 / 1e9, 2),
        "loadavg_start": [round(x, 2) for x in load_start],
        "benchmarks": {},
    }
    for name in only or BENCHMARKS:
        module = importlib.import_module(f"cai.bench.{name}")
        ctx = BenchContext(
            spec, backend, quick, flops, progress, SIZES[mode][name], dict(doc["benchmarks"]), flops_bf16
        )
        doc["params"] = ctx.params
        t = time.time()
        result = module.run(ctx)
        result["seconds_total"] = round(time.time() - t, 1)
        result["note"] = module.NOTE
        doc["benchmarks"][name] = result
        doc["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
        if on_result:
            on_result(name, doc)
    doc["seconds"] = round(time.time() - t0, 1)
    backend.close()
    return doc


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    return f"{x:,.3g}" if isinstance(x, float) and abs(x) < 100 else (f"{x:,.0f}" if isinstance(x, float) else str(x))


def table_rows(doc: dict[str, Any]) -> list[list[str]]:
    """[benchmark, metric, value, unit, target, met, note] for every row of every benchmark."""
    out = []
    for name, res in doc["benchmarks"].items():
        for r in res["rows"]:
            met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
            target = "" if r["target"] is None else f"≥ {_fmt(r['target'])}"
            out.append([name, r["metric"], _fmt(r["value"]), r["unit"], target, met, r["note"]])
    return out


def markdown(doc: dict[str, Any]) -> str:
    """docs/performance.md: machine, load, the table, and what each figure means."""
    m = doc["machine"]
    v = m["versions"]
    lines = [
        "# Performance",
        "",
        f"Written by `cai bench{' --quick' if doc['quick'] else ''}` on {doc['created_at']} "
        f"(model `{doc['model']}`, {doc.get('params', 0) / 1e6:.1f} M parameters, fp32). Re-run it with "
        "`make bench`; every figure below comes from that one run, side by side on the same model, prompts and "
        "token budget.",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['ram_gb']} GB RAM"
        f"{', GPU ' + m['gpu'] if m['gpu'] else ', no GPU'}; torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, trl {v.get('trl')}.",
        f"- Measured fp32 matmul limit: **{doc['matmul_gflops']} GFLOP/s** (`torch.matmul`, 1024² fp32, best of "
        "several repeats, same process); bf16: "
        f"**{doc.get('matmul_gflops_bf16', '–')} GFLOP/s** (the same benchmark in bf16, the yardstick of the "
        "bf16 rows' second figure).",
        f"- Load average (1/5/15 min) at start {doc['loadavg_start']}, at end {doc['loadavg_end']}: a load above "
        f"the core count means other jobs shared the CPU and absolute figures are low; ratios are taken "
        "back to back and suffer less.",
        "",
        "| benchmark | metric | value | unit | target | met | note |",
        "|---|---|---:|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(doc)]
    lines += ["", "## What the figures mean", ""]
    for name, res in doc["benchmarks"].items():
        module = importlib.import_module(f"cai.bench.{name}")
        lines += [f"**{name}** ({res['seconds_total']} s). {(module.__doc__ or '').strip()}", "", res["note"], ""]
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- cai bench: generated from here -->", "<!-- cai bench: generated up to here -->"


def merge_markdown(generated: str, existing: str | None) -> str:
    """The report with ``generated`` between the BEGIN/END markers of ``existing``: what people wrote around the
    table (measurements of other runs, analysis) survives a re-run. A file without markers is replaced."""
    block = f"{BEGIN}\n{generated.rstrip()}\n{END}\n"
    if existing and BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        return head + block + rest.split(END, 1)[1].lstrip("\n")
    return block


def write(doc: dict[str, Any], json_path: Path, md_path: Path | None) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if md_path is not None:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        existing = md_path.read_text(encoding="utf-8") if md_path.is_file() else None
        md_path.write_text(merge_markdown(markdown(doc), existing), encoding="utf-8")
