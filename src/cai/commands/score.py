"""`cai score`: a trained reward model's scores in [0, 1] for (prompt, response) pairs (a thin layer over
cai.training.reward)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from cai.errors import UserError


def score(
    reward: Path = typer.Option(..., "--reward", "-r", help="A run folder or its reward/model."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="The user prompt."),
    response: str | None = typer.Option(None, "--response", help="The assistant response to score."),
    file: Path | None = typer.Option(None, "--file", "-f", help="Batch: .jsonl/.csv with prompt, response."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Batch output JSONL (default: print)."),
) -> None:
    """Score (prompt, response) pairs with a trained reward model: sigmoid of its scalar head, in [0, 1]."""
    from cai.labeling import read_rows
    from cai.training.reward import load_reward_model

    if (file is None) == (prompt is None or response is None):
        raise UserError("pass either --prompt and --response, or --file with prompt/response rows")
    rows = read_rows(file, ("prompt", "response"), "score file") if file else [{"prompt": prompt, "response": response}]
    scorer = load_reward_model(reward)
    scores = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    lines = [
        json.dumps({"prompt": r["prompt"], "response": r["response"], "score": round(s, 6)}, ensure_ascii=False)
        for r, s in zip(rows, scores, strict=False)
    ]
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        Console(stderr=True).print(f"wrote {len(lines)} scores to {out}")
    elif file:
        print("\n".join(lines))
    else:
        print(f"{scores[0]:.4f}")


def register(app: typer.Typer) -> None:
    app.command()(score)
