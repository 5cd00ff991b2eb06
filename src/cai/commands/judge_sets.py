"""`cai judge-sets fetch | pairs | validate | fit`: the external human-labelled sets behind the refusal judge (and
the preference pairs built from them for measuring labelers)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(
    help="External human-labelled answers: download them, measure the refusal judge on them "
    "(held out), refit its weights.",
    no_args_is_help=True,
)
DEFAULT_DIR = Path("data/external")


@app.command("fetch")
def fetch(dest: Path = typer.Option(DEFAULT_DIR, "--dest", help="Folder for the downloaded files.")) -> None:
    """Download XSTest's annotated completions, GPTFuzz's labelled responses, jailbreak-eval's labelled answers
    (measured on only), the prompt sets the request-harm classifier is fitted on and hh-rlhf's harmless-base test
    split (pinned commits, SHA-256)."""
    from cai.evaluation.external_sets import all_sources
    from cai.evaluation.external_sets import fetch as do_fetch

    paths = do_fetch(dest)
    for s, p in zip(all_sources(), paths, strict=True):
        typer.echo(f"{p}  ({s.set}/{s.group}, {s.licence})")


def _table(report: dict) -> str:
    def pct(d: dict) -> str:
        return f"{100 * d['value']:.1f}% [{100 * d['ci_low']:.1f}–{100 * d['ci_high']:.1f}]"

    lines = ["| set | n | accuracy (complied vs not) | complied P / R | not complied P / R |", "|---|---|---|---|---|"]
    for name, r in report.items():
        c, nc = r["per_class"]["complied"], r["per_class"]["not_complied"]
        lines.append(
            f"| {name} | {r['n']} | {pct(r['accuracy_complied_vs_not'])} | {pct(c['precision'])} / "
            f"{pct(c['recall'])} | {pct(nc['precision'])} / {pct(nc['recall'])} |"
        )
    return "\n".join(lines)


@app.command("pairs")
def pairs(
    data: Path = typer.Option(DEFAULT_DIR, "--data", help="Folder made by `cai judge-sets fetch`."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Pairs (JSONL); default data/external/<set>-pairs.jsonl."
    ),
    which: str = typer.Option(
        "xstest",
        "--set",
        help="xstest: clear-cut pairs (development set); hh-harmless-test: hh-rlhf's harmless-base test split "
        "(a reserved held-out set: measure on it, never tune on it).",
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Which answers are drawn (xstest) / which pairs are sampled."),
    per_group: int | None = typer.Option(None, "--per-group", min=1, help="xstest: keep N unsafe and N safe pairs."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="hh-harmless-test: keep a seeded sample of N."),
) -> None:
    """Human-labelled preference pairs for `cai label --reference`: XSTest's clear-cut pairs (a refusal vs a
    compliance to one prompt; people prefer the refusal on unsafe prompts, the compliance on safe ones) or
    hh-rlhf's subtle harmlessness pairs (people picked the less harmful of two assistant turns)."""
    from collections import Counter

    from cai.errors import UserError
    from cai.evaluation.preference_sets import write_hh_rlhf_pairs, write_xstest_pairs

    if which not in ("xstest", "hh-harmless-test"):
        raise UserError(f"--set {which!r}: use xstest or hh-harmless-test")
    if which == "xstest" and limit is not None:
        raise UserError("--limit is for --set hh-harmless-test; XSTest subsets are drawn with --per-group")
    if which == "hh-harmless-test" and per_group is not None:
        raise UserError("--per-group is for --set xstest; sample hh-harmless-test with --limit")
    out = out or data / f"{which}-pairs.jsonl"
    skipped: dict[str, int] = {}
    if which == "xstest":
        rows = write_xstest_pairs(data, out, seed, per_group)
    else:
        rows, skipped = write_hh_rlhf_pairs(data, out, seed, limit)
    groups = ", ".join(f"{n} {g}" for g, n in sorted(Counter(r["group"] for r in rows).items()))
    dropped = ", ".join(f"{n} {why}" for why, n in skipped.items() if n)
    typer.echo(f"{out}: {len(rows)} pairs ({groups})" + (f"; skipped: {dropped}" if dropped else ""))


@app.command("validate")
def validate(
    data: Path = typer.Option(DEFAULT_DIR, "--data", help="Folder made by `cai judge-sets fetch`."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the full report (JSON) here."),
) -> None:
    """Held-out agreement of the refusal judge with the human labels (leave-one-model-out on XSTest)."""
    from cai.evaluation.external_sets import load, load_jailbreak_eval
    from cai.evaluation.judge_validation import validate as do_validate

    report = do_validate({**load(data), "jailbreak_eval": load_jailbreak_eval(data)})
    if out:
        from cai.runs import write_json

        write_json(out, report)
    typer.echo(_table(report))


@app.command("fit")
def fit(
    data: Path = typer.Option(DEFAULT_DIR, "--data", help="Folder made by `cai judge-sets fetch`."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Weights JSON (the shipped file is src/cai/resources/judge/refusal-v3.json)."
    ),
    without: list[str] = typer.Option(
        [], "--without", help="Leave a set out of the fit (xstest or gptfuzz), e.g. to measure on it afterwards."
    ),
) -> None:
    """Refit the refusal judge's weights on XSTest + GPTFuzz train + the project's own set."""
    from cai.errors import UserError
    from cai.evaluation.external_sets import SOURCES, load, training_records
    from cai.evaluation.refusal_classifier import fit_weights
    from cai.runs import write_json

    unknown = sorted(set(without) - {"xstest", "gptfuzz"})
    if unknown:
        raise UserError(f"--without {unknown[0]!r}: choose xstest or gptfuzz")
    records = [r for r in training_records(load(data)) if r.get("set") not in without]
    sources = {
        f"{s.set}/{s.group}": {"url": s.url, "sha256": s.sha256, "licence": s.licence}
        for s in SOURCES
        if not (s.set == "gptfuzz" and s.group == "evaluate") and s.set not in without
    }
    weights = fit_weights(records, sources=sources)
    write_json(out, weights)
    typer.echo(f"wrote {out}: {json.dumps(weights['n_rows'])} training rows")


@app.command("fit-harm")
def fit_harm(
    data: Path = typer.Option(DEFAULT_DIR, "--data", help="Folder made by `cai judge-sets fetch`."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Weights JSON (the shipped file is src/cai/resources/judge/harm-prompt-v2.json)."
    ),
) -> None:
    """Refit the request-harm classifier (the rules labeler's prompt grader) on the fetched prompt sets (HarmBench,
    AdvBench, StrongREJECT, SimpleSafetyTests, CoCoNot, Self-Instruct, GPTFuzz's questions) and the project's own
    red-team / benign prompts; XSTest stays out (it is the classifier's test)."""
    from collections import Counter

    from cai.evaluation.external_sets import HARM_SOURCES, SOURCES, harm_training_records
    from cai.evaluation.harm_classifier import fit_weights
    from cai.runs import write_json

    records = harm_training_records(data)
    used = [s for s in SOURCES if s.set == "gptfuzz" and s.group == "questions"] + list(HARM_SOURCES)
    sources: dict[str, dict[str, str | int]] = {
        f"{s.set}/{s.group}": {"url": s.url, "sha256": s.sha256, "licence": s.licence} for s in used
    }
    sources["cai-lab/redteam+benign"] = {"licence": "Apache-2.0 (this project)"}
    counts = Counter(r["source"] for r in records)
    counts["cai-lab/redteam+benign"] = counts["cai-lab/redteam"] + counts["cai-lab/benign"]
    for name, entry in sources.items():
        entry["rows"] = counts[name]
    weights = fit_weights(
        [r["prompt"] for r in records if r["harmful"]],
        [r["prompt"] for r in records if not r["harmful"]],
        sources=sources,
    )
    write_json(out, weights)
    typer.echo(f"wrote {out}: {json.dumps(weights['n_rows'])} prompts")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="judge-sets")
