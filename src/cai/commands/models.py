"""`cai models`: list the model aliases, or resolve (and cache) one model spec."""

from __future__ import annotations

import time

import typer
from rich.console import Console
from rich.table import Table


def models(
    spec: str | None = typer.Argument(None, help="A model spec to resolve (and cache, for the embedded default)."),
) -> None:
    """List model aliases, or resolve a spec (dequantizing and caching the embedded default on first use)."""
    from cai.models import ALIASES, cache_dir, parse_spec, resolve_local

    if spec is None:
        t = Table(title="model aliases")
        t.add_column("alias")
        t.add_column("what")
        for k, v in ALIASES.items():
            t.add_row(k, v)
        Console().print(t)
        Console().print(
            "Other specs: a local HF folder, a .gguf file, a hub id (online), openai:<model>@<url>[,<url>…], "
            f"vllm:<path-or-id>.\nCache: {cache_dir()}"
        )
        return
    parsed = parse_spec(spec)
    t0 = time.time()
    where = ", ".join(parsed.base_urls) if parsed.kind == "openai" else resolve_local(parsed)
    Console().print(f"{spec}: kind={parsed.kind} -> {where} ({time.time() - t0:.1f}s)")


def register(app: typer.Typer) -> None:
    app.command()(models)
