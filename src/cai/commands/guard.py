"""`cai guard serve`: the OpenAI-compatible server whose answers a supervisor model checks (see docs/guard.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="Serve a policy behind a supervisor model that checks every answer against a constitution.",
    no_args_is_help=True,
)


@app.command()
def serve(
    policy: Annotated[str | None, typer.Option("--policy", help="Answering model spec (default smollm2-135m).")] = None,
    supervisor: Annotated[
        str | None, typer.Option("--supervisor", help="Checking model spec; must score log-probs.")
    ] = None,
    constitution: Annotated[str | None, typer.Option("--constitution", help="Bundled name or YAML file.")] = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default 8000).")] = None,
    api_key: Annotated[
        list[str] | None,
        typer.Option(
            "--api-key",
            help="Accepted bearer key (repeatable); also CAI_GUARD_API_KEYS=k1,k2. Required off loopback.",
        ),
    ] = None,
    allow_prefill: Annotated[bool, typer.Option("--allow-prefill", help="Continue a last assistant message.")] = False,
    max_rounds: Annotated[
        int | None, typer.Option("--max-rounds", help="Critique/revision rounds (default 2).")
    ] = None,
    threshold: Annotated[
        float | None, typer.Option("--threshold", help="P(violation) that sends an answer back (default 0.5).")
    ] = None,
    principle: Annotated[
        list[str] | None, typer.Option("--principle", help="Check only these principles (repeatable).")
    ] = None,
    audit_log: Annotated[
        Path | None, typer.Option("--audit-log", help="JSONL audit log (default guard-audit.jsonl).")
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", help="YAML with any GuardConfig field; flags win.")] = None,
) -> None:
    """Serve POST /v1/chat/completions, GET /v1/models, /health and /metrics."""
    from cai.constitution import load_constitution
    from cai.guard.config import load_guard_config
    from cai.guard.server import serve as run_server

    keys = list(api_key or []) + [k.strip() for k in os.environ.get("CAI_GUARD_API_KEYS", "").split(",") if k.strip()]
    cfg = load_guard_config(
        config,
        {
            "policy": policy,
            "supervisor": supervisor,
            "constitution": constitution,
            "host": host,
            "port": port,
            "api_keys": keys,
            "allow_prefill": allow_prefill or None,
            "max_rounds": max_rounds,
            "threshold": threshold,
            "principles": list(principle or []),
            "audit_log": audit_log,
        },
    )
    cfg.check_security()
    loaded = load_constitution(cfg.constitution)  # bad input fails in one line before anything loads
    for name in cfg.principles:
        loaded.principle(name)

    def announce() -> None:
        Console(stderr=True).print(
            f"[bold]cai guard[/bold] policy={cfg.policy} supervisor={cfg.supervisor} constitution={cfg.constitution} "
            f"rounds={cfg.max_rounds} threshold={cfg.threshold}; http://{cfg.host}:{cfg.port}; loading models…"
        )

    run_server(cfg, announce=announce)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="guard")
