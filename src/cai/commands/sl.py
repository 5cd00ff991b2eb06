"""``cai sl``: supervised-learning (SL-CAI) tools beside the pipeline stages."""

from __future__ import annotations

from pathlib import Path

import typer

from cai.errors import UserError

app = typer.Typer(
    help="SL-CAI tools: compare loss on the assistant's tokens vs the whole sequence.", no_args_is_help=True
)


def _records(source: Path) -> list[dict]:
    from cai.runs import read_jsonl

    path = source / "critique" / "sft.jsonl" if source.is_dir() else source
    if not path.is_file():
        raise UserError(f"{path}: not found; pass a run folder with a finished critique stage or an SFT JSONL file")
    records = read_jsonl(path)
    if not records:
        raise UserError(f"{path}: no records")
    return records


@app.command("compare-loss")
def compare_loss(
    source: Path = typer.Argument(..., help="A run folder (uses critique/sft.jsonl) or a JSONL of {id, messages}."),
    base: str = typer.Option("smollm2-135m", "--base", help="Model spec to fine-tune."),
    out: Path = typer.Option(Path("runs/compare-loss"), "--out", "-o", help="Output folder."),
    epochs: float = typer.Option(3.0, "--epochs", min=0.01),
    max_steps: int | None = typer.Option(None, "--max-steps", min=1),
    eval_fraction: float = typer.Option(0.25, "--eval-fraction", min=0.01, max=0.9),
    max_length: int = typer.Option(384, "--max-length", min=16),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed (0 to 2^32-1)."),
) -> None:
    """Fine-tune twice (loss on assistant tokens / on the whole sequence) and compare held-out NLLs."""
    from rich.console import Console
    from rich.table import Table

    from cai.training.sft import SFTTrainConfig, compare_loss_on

    settings = SFTTrainConfig(epochs=epochs, max_steps=max_steps, eval_fraction=eval_fraction, max_length=max_length)
    res = compare_loss_on(base, _records(source), out, settings, seed=seed)
    t = Table(title=f"loss on assistant vs whole sequence ({res['n_heldout']} held-out of {res['n_records']})")
    for col in ("model", "answer NLL/token", "prompt NLL/token", "train loss", "steps", "seconds"):
        t.add_column(col)
    for name, m in res["models"].items():
        t.add_row(
            name,
            str(m["answer_nll"]),
            str(m["prompt_nll"]),
            str(m.get("train_loss", "")),
            str(m.get("steps", "")),
            str(m.get("seconds", "")),
        )
    Console().print(t)
    Console().print(f"wrote {out / 'compare.json'}")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="sl")
