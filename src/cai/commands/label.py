"""`cai label`: AI-feedback labels for a file of preference pairs, with diagnostics and agreement with a
human-labelled reference (a thin layer over cai.labeling)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from cai.errors import UserError


def label(
    pairs: Path | None = typer.Option(None, "--pairs", help=".jsonl/.csv with prompt, a, b (the pairs to label)."),
    reference: Path | None = typer.Option(
        None,
        "--reference",
        help=".jsonl/.csv of human-labelled pairs: " "prompt, chosen, rejected; reports agreement with a 95% CI.",
    ),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Feedback model spec (needs log-probs)."),
    constitution: str = typer.Option("harmless", "--constitution", "-c"),
    k: int = typer.Option(2, "--principles", "-k", min=1, help="Principles sampled per pair."),
    cot: bool = typer.Option(False, "--cot", help="Chain-of-thought labels (clamped to [0.4, 0.6])."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write labelled pairs (JSONL) here."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed (0 to 2^32-1)."),
) -> None:
    """Label preference pairs with a feedback model and print diagnostics (swap consistency, entropy, and
    agreement with a reference set)."""
    from cai.backends import get_backend
    from cai.constitution import load_constitution
    from cai.labeling import (
        LabelConfig,
        Pair,
        agreement_with_reference,
        label_diagnostics,
        label_in_batches,
        label_record,
        read_reference,
        read_rows,
    )

    if pairs is None and reference is None:
        raise UserError("pass --pairs FILE to label, --reference FILE to measure agreement, or both")
    settings = LabelConfig(principles_per_pair=k, cot=cot)
    const = load_constitution(constitution)
    todo = [
        Pair(str(r.get("id") or r["_line"]), r["prompt"], r["a"], r["b"])
        for r in (read_rows(pairs, ("prompt", "a", "b")) if pairs else [])
    ]
    ref = read_reference(reference) if reference else []
    backend = get_backend(model)
    con = Console(highlight=False)
    if todo:
        labels, rate = label_in_batches(backend, todo, const, settings, seed=seed)
        rows = [label_record(lab, p) for lab, p in zip(labels, todo, strict=False)]
        diag = label_diagnostics(rows)
        con.print(
            f"labelled {len(rows)} pairs at {rate:.2f} pairs/s; swap consistency "
            f"{diag['swap_consistency']['rate']:.0%}, mean label entropy {diag['label_entropy_bits']:.2f} bits, "
            f"P(first option) {diag['position_bias_first']:.2f}"
        )
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            con.print(f"wrote {out}")
    if ref:
        agreement = agreement_with_reference(backend, ref, const, settings, seed=seed)
        con.print(("[green]" if agreement["above_chance"] else "[yellow]") + agreement["verdict"])


def register(app: typer.Typer) -> None:
    app.command()(label)
