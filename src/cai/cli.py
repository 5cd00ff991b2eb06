"""The ``cai`` command line: a thin layer over library functions. User errors print one line and exit 2."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cai.errors import UserError

app = typer.Typer(help="cai-lab: Constitutional AI and alignment-robustness experiments on open language models.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
console = Console(stderr=True)


# Feature modules under cai.commands that add commands: each defines ``register(app)`` (top-level commands) or
# ``app`` (a command group named after the module).
COMMAND_MODULES = ["constitution", "guard", "rl", "evaluation", "judge_sets", "sl", "experiments", "bench"]


def _add_subapps() -> None:
    """Commands owned by their feature modules."""
    import importlib

    for name in COMMAND_MODULES:
        module = importlib.import_module(f"cai.commands.{name}")
        if hasattr(module, "register"):
            module.register(app)
        else:
            app.add_typer(module.app, name=name)


@app.callback()
def _global(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()


@app.command()
def models(spec: Optional[str] = typer.Argument(None, help="A model spec to resolve (and cache, for the embedded default).")) -> None:
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


@app.command()
def generate(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model spec (see `cai models`)."),
    prompts: str = typer.Option(..., "--prompts", "-p", help="Prompt file (jsonl/csv/txt/json), bundled name, or hf:<dataset>."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder; responses.jsonl and manifest.json go there."),
    field: Optional[str] = typer.Option(None, "--field", help="Field holding the prompt text."),
    split: Optional[str] = typer.Option(None, "--split", help="Keep only prompts of this split."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Keep the first N prompts."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.7, "--temperature", min=0.0),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed (0 to 2^32-1)."),
    force: bool = typer.Option(False, "--force", help="Recompute even if OUT holds results made with other settings."),
) -> None:
    """Generate one response per prompt with any backend; resumable (a rerun skips finished ids)."""
    from cai.backends import SamplingParams, get_backend
    from cai.data import load_prompts
    from cai.generation import generate_responses
    from cai.runs import StageDir

    ps = load_prompts(prompts, field, split=split, limit=limit)
    if len(ps) == 0:
        raise UserError(f"{prompts}: no prompts left after --split/--limit")
    sampling = SamplingParams(max_new_tokens, temperature, top_p, [], seed, 1.1)
    stage = StageDir(out, "generate")
    cfg = {"model": model, "prompts": prompts, "field": field, "split": split, "limit": limit, "system": system,
           "sampling": sampling.__dict__}
    stage.begin(cfg, force=force, run_name=str(out), elsewhere="another --out folder for a separate run")
    for s in ps.skipped:
        stage.skip(f"line:{s.get('line', '?')}", s.get("reason", "skipped"))
    backend = get_backend(model, batch_size=batch_size)
    with stage.writer("responses.jsonl") as w:
        stats = generate_responses(backend, ps.prompts, w, sampling, stage=stage, system_prompt=system,
                                   chunk=max(batch_size, 8))
        total = len(w.done)
    stage.finish({"prompts": len(ps), "responses": total, "skipped_input_lines": len(ps.skipped), **stats})
    Console().print(f"wrote {total} responses to {stage.file('responses.jsonl')} "
                    f"({stats['generated']} new, {stats['tokens_per_s']} tok/s, {stats['errors']} errors, "
                    f"{len(ps.skipped)} input lines skipped)")


@app.command()
def run(
    config: Optional[Path] = typer.Argument(None, help="Run config YAML (default: built-in defaults)."),
    name: Optional[str] = typer.Option(None, "--name", help="Run name (folder under runs_dir); overrides the config."),
    constitution: Optional[str] = typer.Option(None, "--constitution", help="Constitution name or file; overrides the config."),
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
    console.print(f"[bold]run[/bold] {cfg.name}: stages {' → '.join(cfg.stages)}; policy={cfg.models.policy}, "
                  f"feedback={cfg.models.feedback_spec}")
    if cfg.models.weak_feedback:
        console.print("[yellow]feedback model is the policy itself / the 135M default: critiques, labels and judge "
                      "verdicts will be weak. Set models.feedback to a stronger model (see README).[/yellow]")

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


def _default_name(config: Optional[Path], constitution: str) -> str:
    base = config.stem if config else "quickstart"
    return f"{base}-{Path(constitution).stem}"


def main() -> None:
    """Entry point: one line and exit 2 for user errors; bugs still raise."""
    _add_subapps()
    try:
        app()
    except UserError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted; rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
