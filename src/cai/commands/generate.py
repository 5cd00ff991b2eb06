"""`cai generate`: one response per prompt with any backend, resumable."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cai.errors import UserError


def generate(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model spec (see `cai models`)."),
    prompts: str = typer.Option(
        ..., "--prompts", "-p", help="Prompt file (jsonl/csv/txt/json), bundled name, or hf:<dataset>."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder; responses.jsonl and manifest.json go there."),
    field: str | None = typer.Option(None, "--field", help="Field holding the prompt text."),
    split: str | None = typer.Option(None, "--split", help="Keep only prompts of this split."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Keep the first N prompts."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed (0 to 2^32-1)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if OUT holds results made with other settings."),
) -> None:
    """Generate one response per prompt with any backend; resumable (a rerun skips finished ids)."""
    from cai.backends import SamplingParams, get_backend
    from cai.backends.base import CHAT_REPETITION_PENALTY
    from cai.data import load_prompts
    from cai.generation import generate_responses
    from cai.runs import StageDir

    ps = load_prompts(prompts, field, split=split, limit=limit)
    if len(ps) == 0:
        raise UserError(f"{prompts}: no prompts left after --split/--limit")
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        repetition_penalty=CHAT_REPETITION_PENALTY,
    )
    stage = StageDir(out, "generate")
    cfg = {
        "model": model,
        "prompts": prompts,
        "field": field,
        "split": split,
        "limit": limit,
        "system": system,
        "sampling": sampling.__dict__,
    }
    stage.begin(cfg, force=force, run_name=str(out), elsewhere="another --out folder for a separate run")
    for s in ps.skipped:
        stage.skip(f"line:{s.get('line', '?')}", s.get("reason", "skipped"))
    backend = get_backend(model, batch_size=batch_size)
    with stage.writer("responses.jsonl") as w:
        stats = generate_responses(
            backend, ps.prompts, w, sampling, stage=stage, system_prompt=system, chunk=max(batch_size, 8)
        )
        total = len(w.done)
    stage.finish({"prompts": len(ps), "responses": total, "skipped_input_lines": len(ps.skipped), **stats})
    Console().print(
        f"wrote {total} responses to {stage.file('responses.jsonl')} "
        f"({stats['generated']} new, {stats['tokens_per_s']} tok/s, {stats['errors']} errors, "
        f"{len(ps.skipped)} input lines skipped)"
    )


def register(app: typer.Typer) -> None:
    app.command()(generate)
