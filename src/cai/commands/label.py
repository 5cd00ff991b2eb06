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
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="In-process feedback model's weights: auto (fp32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16 | "
        "int8. bf16 labels about 1.7x faster on a CPU with AVX-512 BF16 and moves them by ~0.02 "
        "(docs/performance.md); int8 flips about half of them.",
    ),
    constitution: str = typer.Option("harmless", "--constitution", "-c"),
    k: int = typer.Option(2, "--principles", "-k", min=1, help="Principles sampled per pair."),
    cot: bool = typer.Option(False, "--cot", help="Chain-of-thought labels (clamped to [0.4, 0.6])."),
    labeler: str = typer.Option(
        "choice",
        "--labeler",
        "-l",
        help="choice: (A)/(B) log-probs; contrast: principle vs inverse likelihood; rules: the constitution's "
        "wanted behaviour graded by the offline refusal judge and request-harm classifier (no --model needed).",
    ),
    reduction: str = typer.Option("mean", "--reduction", help="contrast: per-token mean or summed log-probs."),
    wording: str = typer.Option(
        "revision", "--wording", help="contrast: the principle's revision or critique request, or system_prompt."
    ),
    temperature: float | None = typer.Option(
        None, "--temperature", help="contrast / rules: sigmoid(score difference / T) (default 1.0 / 0.25)."
    ),
    judge_weights: Path | None = typer.Option(
        None, "--judge-weights", help="rules: refusal-judge weights JSON (`cai judge-sets fit`); default: shipped."
    ),
    report: Path | None = typer.Option(None, "--report", help="Write the reference agreement (JSON) here."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write labelled pairs (JSONL) here."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed (0 to 2^32-1)."),
) -> None:
    """Label preference pairs with a feedback model and print diagnostics (swap consistency, entropy, and
    agreement with a reference set)."""
    from pydantic import ValidationError

    from cai.backends import get_backend
    from cai.base_config import format_validation_error
    from cai.constitution import load_constitution
    from cai.labeling import (
        LABELERS,
        LabelConfig,
        Pair,
        agreement_with_reference,
        check_labeler,
        harmful_field,
        label_diagnostics,
        label_in_batches,
        label_record,
        read_reference,
        read_rows,
    )
    from cai.models import check_dtype_flag

    if pairs is None and reference is None:
        raise UserError("pass --pairs FILE to label, --reference FILE to measure agreement, or both")
    if labeler not in LABELERS:
        raise UserError(f"--labeler {labeler!r} is not a labeler; choose one of: {', '.join(LABELERS)}")
    check_dtype_flag(dtype)
    optional: dict[str, object] = {}  # left out when not given, so each labeler keeps its own default
    if temperature is not None:
        optional["rules_temperature" if labeler == "rules" else "contrast_temperature"] = temperature
    if judge_weights is not None:
        optional["rules_judge_weights"] = str(judge_weights)
    try:
        settings = LabelConfig(
            principles_per_pair=k,
            cot=cot,
            labeler=labeler,
            contrast_reduction=reduction,
            contrast_wording=wording,
            **optional,
        )
    except ValidationError as exc:
        raise UserError(format_validation_error("cai label", exc)) from None
    const = load_constitution(constitution)
    check_labeler(settings, const)
    todo = [
        Pair(str(r.get("id") or r["_line"]), r["prompt"], r["a"], r["b"], harmful=harmful_field(r, pairs or ""))
        for r in (read_rows(pairs, ("prompt", "a", "b")) if pairs else [])
    ]
    ref = read_reference(reference) if reference else []
    backend = None if labeler == "rules" else get_backend(model, dtype=dtype)  # rules asks no language model
    con = Console(highlight=False)
    if todo:
        labels, rate = label_in_batches(backend, todo, const, settings, seed=seed)
        rows = [label_record(lab, p) for lab, p in zip(labels, todo, strict=False)]
        diag = label_diagnostics(rows)
        swap = (
            f"swap consistency {diag['swap_consistency']['rate']:.0%}, P(first option) "
            f"{diag['position_bias_first']:.2f}, "
            if "swap_consistency" in diag
            else ""
        )
        con.print(
            f"labelled {len(rows)} pairs at {rate:.2f} pairs/s; {swap}mean label entropy "
            f"{diag['label_entropy_bits']:.2f} bits"
        )
        if out:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            con.print(f"wrote {out}")
    if ref:
        agreement = agreement_with_reference(backend, ref, const, settings, seed=seed)
        ref_rate = agreement["pairs_per_s"]
        con.print(("[green]" if agreement["above_chance"] else "[yellow]") + agreement["verdict"])
        con.print(f"  {ref_rate:.2f} pairs/s, ECE {agreement['ece']:.3f}" + _swap_text(agreement))
        for group, g in agreement.get("by_group", {}).items():
            con.print(
                f"  {group}: {g['agreement']:.0%} [{g['ci_low']:.0%}-{g['ci_high']:.0%}] of {g['n']}, "
                f"ECE {g['ece']:.3f}" + _swap_text(g)
            )
        if report:
            report.parent.mkdir(parents=True, exist_ok=True)
            used = None if labeler == "rules" else model
            precision = getattr(backend, "precision", None)  # None: no model, or a server that does not say
            report.write_text(
                json.dumps({"labeler": dict(settings), "model": used, "precision": precision, **agreement}, indent=1)
            )
            con.print(f"wrote {report}")


def _swap_text(agreement: dict) -> str:
    swap = agreement.get("swap_consistency")
    return "" if swap is None else f", swap-consistent {swap:.0%}"


def register(app: typer.Typer) -> None:
    app.command()(label)
