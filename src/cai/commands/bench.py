"""`cai bench`: throughput benchmarks (``cai.bench``), printed as a table and written as JSON + Markdown."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cai.errors import UserError

# Relative to the current directory: run from a checkout's root (`make bench`), they are the checkout's own figures.
RESULTS = Path("docs/performance.json")
QUICK_RESULTS = Path("docs/performance-quick.json")
REPORT = Path("docs/performance.md")


def bench(
    quick: bool = typer.Option(False, "--quick", help="Small sizes (about 3 minutes on a 2-core CPU)."),
    only: list[str] = typer.Option(
        [],
        "--only",
        help="Run only this benchmark (repeatable): generation, eval, labels, critique, sft (eval compares itself "
        "with generation's best row only when both run together).",
    ),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="In-process model spec to measure."),
    out: Path | None = typer.Option(
        None, "--out", help=f"JSON results (default {RESULTS}, or {QUICK_RESULTS} " "with --quick)."
    ),
    doc: Path | None = typer.Option(
        None,
        "--doc",
        help=f"Markdown report (default {REPORT} for a " "full run; a quick run writes none unless given).",
    ),
) -> None:
    """Measure generation, the eval stage, AI-feedback labelling, critique→revision and SFT throughput side by side."""
    from cai.bench.run import BENCHMARKS, run_benchmarks, table_rows, write

    unknown = [o for o in only if o not in BENCHMARKS]
    if unknown:
        raise UserError(f"--only {unknown[0]!r}: unknown benchmark; choose from {', '.join(BENCHMARKS)}")
    from cai.models import parse_spec

    spec = parse_spec(model)
    if not spec.in_process:
        raise UserError(f"--model {model!r}: cai bench measures in-process models; pass a local folder or alias")
    out = out or (QUICK_RESULTS if quick else RESULTS)
    doc = doc or (None if quick else REPORT)
    console = Console(stderr=True)

    earlier: dict = {}
    if only and out.is_file():  # a partial run updates its benchmarks in the earlier results, keeps the others
        old = json.loads(out.read_text(encoding="utf-8"))
        if old.get("model") == model and old.get("quick") == quick:
            earlier = old.get("benchmarks", {})

    def save(name: str, partial: dict) -> None:  # after every benchmark, so a killed run keeps what it measured
        console.print(f"  [green]✓[/green] {name} ({partial['benchmarks'][name]['seconds_total']} s)")
        write({**partial, "benchmarks": {**earlier, **partial["benchmarks"]}}, out, doc)

    results = run_benchmarks(spec, quick=quick, only=list(only) or None, progress=True, on_result=save)
    results["benchmarks"] = {**earlier, **results["benchmarks"]}
    write(results, out, doc)
    table = Table(
        title=f"cai bench ({model}, matmul {results['matmul_gflops']} GFLOP/s, "
        f"load {results['loadavg_start'][0]}→{results['loadavg_end'][0]})"
    )
    for col in ("benchmark", "metric", "value", "unit", "target", "met", "note"):
        table.add_column(col)
    for r in table_rows(results):
        table.add_row(*[c.replace("**", "") for c in r])
    Console().print(table)
    Console().print(f"wrote {out}" + (f" and {doc}" if doc else ""))


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
