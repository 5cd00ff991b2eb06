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
    reference: Path | None = typer.Option(
        None,
        "--reference",
        help="Human-labelled pairs (prompt, chosen, rejected[, group]): the reward model's agreement with a 95% CI, "
        "per group, and its calibration (ECE of sigmoid(r_chosen - r_rejected)).",
    ),
    report: Path | None = typer.Option(None, "--report", help="With --reference: write the agreement (JSON) here."),
) -> None:
    """Score (prompt, response) pairs with a trained reward model: sigmoid of its scalar head, in [0, 1]."""
    from cai.labeling import read_rows
    from cai.training.reward import load_reward_model

    if reference is not None:
        if file is not None or prompt is not None or response is not None:
            raise UserError("--reference measures agreement on its own; leave out --prompt/--response/--file")
        _agreement(reward, reference, report)
        return
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


def _agreement(reward: Path, reference: Path, report: Path | None) -> None:
    """The reward model as a labeller of human-labelled pairs: P(chosen better) = sigmoid(r_c - r_r) on the raw
    scalar head (the logit of its [0, 1] score), measured like `cai label --reference`."""
    import math

    from cai.labeling import Label, read_reference, reference_agreement
    from cai.training.reward import load_reward_model

    pairs = read_reference(reference)
    scorer = load_reward_model(reward)
    scores = scorer.score([p.prompt for p in pairs for _ in range(2)], [y for p in pairs for y in (p.a, p.b)])

    def logit(x: float) -> float:
        x = min(max(x, 1e-9), 1 - 1e-9)
        return math.log(x / (1 - x))

    labels = []
    for i, p in enumerate(pairs):
        margin = logit(scores[2 * i]) - logit(scores[2 * i + 1])
        labels.append(
            Label(p.id, 1 / (1 + math.exp(-margin)), [], {}, None, None, labeler="reward_model", scores=(0.0, 0.0))
        )
    agreement = reference_agreement(labels, [p.group for p in pairs])
    con = Console(highlight=False)
    con.print(("[green]" if agreement["above_chance"] else "[yellow]") + agreement["verdict"])
    con.print(f"  ECE {agreement['ece']:.3f}")
    for group, g in agreement.get("by_group", {}).items():
        con.print(f"  {group}: {g['agreement']:.0%} [{g['ci_low']:.0%}-{g['ci_high']:.0%}] of {g['n']}")
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps({"reward_model": str(reward), **agreement}, indent=1))
        con.print(f"wrote {report}")


def register(app: typer.Typer) -> None:
    app.command()(score)
