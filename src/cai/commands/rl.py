"""`cai score` (reward model scores in [0, 1]) and `cai label` (AI-feedback labels for a pair file, with
diagnostics): thin layers over cai.training.reward and cai.labeling."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from cai.errors import UserError


def score(
    reward: Path = typer.Option(..., "--reward", "-r", help="A run folder or its reward/model."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="The user prompt."),
    response: Optional[str] = typer.Option(None, "--response", help="The assistant response to score."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Batch: .jsonl/.csv with prompt, response."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Batch output JSONL (default: print)."),
) -> None:
    """Score (prompt, response) pairs with a trained reward model: sigmoid of its scalar head, in [0, 1]."""
    from cai.labeling import read_rows
    from cai.training.reward import load_reward_model

    if (file is None) == (prompt is None or response is None):
        raise UserError("pass either --prompt and --response, or --file with prompt/response rows")
    rows = read_rows(file, ("prompt", "response"), "score file") if file else [{"prompt": prompt, "response": response}]
    scorer = load_reward_model(reward)
    scores = scorer.score([r["prompt"] for r in rows], [r["response"] for r in rows])
    lines = [json.dumps({"prompt": r["prompt"], "response": r["response"], "score": round(s, 6)}, ensure_ascii=False)
             for r, s in zip(rows, scores)]
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        Console(stderr=True).print(f"wrote {len(lines)} scores to {out}")
    elif file:
        print("\n".join(lines))
    else:
        print(f"{scores[0]:.4f}")


def label(
    pairs: Optional[Path] = typer.Option(None, "--pairs", help=".jsonl/.csv with prompt, a, b (the pairs to label)."),
    reference: Optional[Path] = typer.Option(None, "--reference", help=".jsonl/.csv of human-labelled pairs: "
                                             "prompt, chosen, rejected; reports agreement with a 95% CI."),
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Feedback model spec (needs log-probs)."),
    constitution: str = typer.Option("harmless", "--constitution", "-c"),
    k: int = typer.Option(2, "--principles", "-k", min=1, help="Principles sampled per pair."),
    cot: bool = typer.Option(False, "--cot", help="Chain-of-thought labels (clamped to [0.4, 0.6])."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write labelled pairs (JSONL) here."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed (0 to 2^32-1)."),
) -> None:
    """Label preference pairs with a feedback model and print diagnostics (swap consistency, entropy, and
    agreement with a reference set)."""
    from cai.backends import get_backend
    from cai.constitution import load_constitution
    from cai.labeling import (LabelSettings, Pair, label_diagnostics, label_in_batches, label_record, read_reference,
                              read_rows, reference_agreement)

    if pairs is None and reference is None:
        raise UserError("pass --pairs FILE to label, --reference FILE to measure agreement, or both")
    settings = LabelSettings(principles_per_pair=k, cot=cot)
    const = load_constitution(constitution)
    todo = [Pair(str(r.get("id") or r["_line"]), r["prompt"], r["a"], r["b"])
            for r in (read_rows(pairs, ("prompt", "a", "b")) if pairs else [])]
    ref = read_reference(reference) if reference else []
    backend = get_backend(model)
    con = Console(highlight=False)
    if todo:
        labels, rate = label_in_batches(backend, todo, const, settings, seed=seed)
        rows = [label_record(lab, p) for lab, p in zip(labels, todo)]
        diag = label_diagnostics(rows)
        con.print(f"labelled {len(rows)} pairs at {rate:.2f} pairs/s; swap consistency "
                  f"{diag['swap_consistency']['rate']:.0%}, mean label entropy {diag['label_entropy_bits']:.2f} bits, "
                  f"P(first option) {diag['position_bias_first']:.2f}")
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            con.print(f"wrote {out}")
    if ref:
        labels, _ = label_in_batches(backend, ref, const, settings, seed=seed)
        agreement = reference_agreement(labels)
        con.print(("[green]" if agreement["above_chance"] else "[yellow]") + agreement["verdict"])


def register(app: typer.Typer) -> None:
    app.command()(score)
    app.command()(label)
