"""`cai run`: the pipeline stages a run config lists, in order, resumably (a thin layer over cai.pipeline)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cai.errors import UserError

console = Console(stderr=True)


def run(
    config: Path | None = typer.Argument(
        None, help="Run config: a bundled name (quickstart) or a YAML file (default: built-in defaults)."
    ),
    name: str | None = typer.Option(None, "--name", help="Run name (folder under runs_dir); overrides the config."),
    constitution: str | None = typer.Option(
        None, "--constitution", help="Constitution name or file; overrides the config."
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set generation.max_new_tokens=64."),
    stage: list[str] = typer.Option([], "--stage", help="Run only these stages (repeatable)."),
    force: bool = typer.Option(False, "--force", help="Recompute stages even if complete or made with another config."),
) -> None:
    """Run the pipeline stages a config lists, in order, resumably."""
    from cai.config import load_config
    from cai.pipeline import run_pipeline

    overrides = list(set_)
    if name:
        overrides.append(f"name={name}")
    if constitution:
        overrides.append(f"constitution={constitution}")
        if not name:
            overrides.append(f"name={_default_name(config, constitution)}")
    cfg = load_config(config, overrides)
    unknown = [s for s in stage if s not in cfg.stages]
    if unknown:
        raise UserError(f"--stage {unknown[0]!r} is not among this config's stages ({', '.join(cfg.stages)})")
    console.print(
        f"[bold]run[/bold] {cfg.name}: stages {' → '.join(cfg.stages)}; policy={cfg.models.policy}, "
        f"feedback={cfg.models.feedback_spec}"
    )
    if cfg.models.weak_feedback:
        console.print(
            "[yellow]feedback model is the policy itself / the 135M default: critiques, labels and judge "
            "verdicts will be weak. Set models.feedback to a stronger model (see README).[/yellow]"
        )

    def show(stage_name: str, summary: dict) -> None:
        brief = ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, (dict, list)))
        console.print(f"  [green]✓[/green] {stage_name}: {brief}")

    summaries = run_pipeline(cfg, force=force, only=stage or None, on_stage=show)
    table = Table(title=f"run {cfg.name} → {Path(cfg.runs_dir) / cfg.name}")
    table.add_column("stage")
    table.add_column("summary")
    for k, v in summaries.items():
        table.add_row(k, ", ".join(f"{a}={b}" for a, b in v.items() if not isinstance(b, (dict, list))))
    Console().print(table)


def _default_name(config: Path | None, constitution: str) -> str:
    base = config.stem if config else "quickstart"
    return f"{base}-{Path(constitution).stem}"


def register(app: typer.Typer) -> None:
    app.command()(run)
