"""`cai push`: a run's model or datasets to the Hugging Face Hub (a thin layer over cai.hub)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console


def push(
    run: Path = typer.Argument(..., help="Run folder (runs/<name>)."),
    repo: str = typer.Option(..., "--repo", help="Hub repo id, e.g. you/cai-smollm2-rl."),
    what: str = typer.Option(
        "model", "--what", help="model (the final policy) | sft | reward | rl | dpo | datasets (feedback JSONL)."
    ),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
) -> None:
    """Upload a trained model folder (with its model card) or the run's datasets to the Hugging Face Hub."""
    from cai.hub import push as push_run

    url = push_run(run, repo, what=what, private=private)
    Console(stderr=True).print(f"pushed {run.name} ({what}) to {url}", soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("push")(push)
