"""`cai poison scan|eval`: find a planted preference in a fine-tuning set without knowing it, and measure how
well that works (a thin layer over :mod:`cai.experiments.poison_scan`)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cai.commands.experiments import ForceOpt, NameOpt, SetOpt, _config, _show

poison_app = typer.Typer(
    help="Data-poisoning scans: find a trait planted in a fine-tuning set by probing what training on it does.",
    no_args_is_help=True,
)


@poison_app.command("scan")
def poison_scan(
    dataset: Path = typer.Argument(..., help="JSONL SFT records to scan ({id, messages} or {prompt, response})."),
    base: str = typer.Option(..., "--base", help="The model the dataset would fine-tune (local folder or alias)."),
    control: Path | None = typer.Option(
        None,
        "--control",
        help="Clean records of the same format (default: the base's own answers to the " "dataset's prompts).",
    ),
    top_k: int = typer.Option(10, "--top-k", min=1, help="How many candidates to print and keep in the JSON."),
    out: Path | None = typer.Option(None, "--out", help="Also write the scan's JSON here."),
    runs_dir: Path = typer.Option(Path("runs"), "--runs-dir", help="Where the run folder goes."),
    set_: list[str] = SetOpt,
    name: str | None = NameOpt,
    force: bool = ForceOpt,
) -> None:
    """Fine-tune a short LoRA probe on DATASET and a matched control, score both on the preference battery, and
    rank every candidate by its shift relative to the control."""
    from cai.base_config import validate_yaml
    from cai.evaluation.report import markdown_table
    from cai.experiments import poison_scan as ps

    cfg = validate_yaml(
        ps.ScanConfig,
        None,
        [
            f"dataset={dataset}",
            f"base={base}",
            f"policy={base}",
            f"top_k={top_k}",
            f"runs_dir={runs_dir}",
            f"name={name or 'scan-' + dataset.stem}",
            *([f"control={control}"] if control else []),
            *set_,
        ],
    )
    res = ps.scan(cfg, force=force)
    con = Console()
    con.print(markdown_table(ps.TOP_HEADER, ps.format_top(res)))
    verdict = "FLAGGED" if res["flagged"] else "not flagged"
    top = res["top"][0]
    con.print(
        f"{verdict}: top candidate {top['category']}: {top['candidate']} (z = {top['z']:.1f}, p = {top['p_null']:.1e}; "
        f"flag at p ≤ {res['threshold_p']:.1e}, Bonferroni over {res['n_candidates']} candidates, null from "
        f"{res['control_replicates']} control fine-tunes); control: {res['control']}"
    )
    written = ps.write_out(res, out)
    con.print(f"scan → {res['run']}/scan.json" + (f" and {written}" if written else ""))


@poison_app.command("eval")
def poison_eval(
    config: Path | None = typer.Argument(
        None, help="Experiment config: a bundled name or a YAML file (default: the bundled poison_scan)."
    ),
    set_: list[str] = SetOpt,
    name: str | None = NameOpt,
    force: bool = ForceOpt,
) -> None:
    """Plant traits (subliminal numbers and plain chat data), scan each and several clean datasets, and report
    recall@1/@5 and the false-positive rate with CIs."""
    from cai.experiments import poison_eval as pe

    _show(pe.run(_config(pe.ScanEvalConfig, config, "poison_scan", set_, name), force=force), "poison eval")


def register(app: typer.Typer) -> None:
    app.add_typer(poison_app, name="poison")
