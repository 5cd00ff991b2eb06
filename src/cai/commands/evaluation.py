"""`cai eval`, `cai judge`, `cai report`, `cai compare`: thin wrappers over cai.evaluation."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from cai.errors import UserError


def _out() -> Console:
    return Console(highlight=False)


def eval_(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model spec (see `cai models`)."),
    prompts: str = typer.Option(..., "--prompts", "-p", help="Harmful prompts: file, bundled name, hf:<dataset> or "
                                "bench:<name>[:<file>] (advbench, harmbench, xstest, donotanswer, hh-redteam)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: samples.jsonl, metrics.json, manifest.json."),
    field: Optional[str] = typer.Option(None, "--field", help="Field holding the harmful prompt text."),
    benign: Optional[str] = typer.Option(None, "--benign", help="Benign prompts (for the over-refusal rate)."),
    benign_field: Optional[str] = typer.Option(None, "--benign-field", help="Field holding the benign prompt text."),
    judge: str = typer.Option("refusal", "--judge", help="refusal | reward:<path> | a model spec (LLM judge)."),
    split: Optional[str] = typer.Option(None, "--split", help="Keep only prompts of this split (e.g. eval)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="First N harmful prompts."),
    benign_limit: Optional[int] = typer.Option(None, "--benign-limit", min=1, help="First N benign prompts."),
    system: Optional[str] = typer.Option(None, "--system", help="System prompt."),
    prefill: Optional[str] = typer.Option(None, "--prefill", help="Start every assistant turn with this text."),
    prefill_k: Optional[str] = typer.Option(None, "--prefill-k", help="Also run the prefill attack for these k "
                                            "(comma-separated token counts, e.g. 0,4,8) into OUT/prefill."),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", min=0.01),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Prompts per generation batch (in-process "
                                   "models; 64 suits the 135M default on a CPU)."),
    stop_loops: bool = typer.Option(True, "--stop-loops/--no-stop-loops", help="End an answer once it is a "
                                    "degenerate repetition (finish_reason loop, labelled a loop)."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Recompute even if OUT holds results made with other settings."),
) -> None:
    """Answer harmful (and benign) prompts, judge every answer, and report rates with 95% CIs."""
    from cai.backends import SamplingParams, get_backend
    from cai.evaluation.evaluate import evaluate_model
    from cai.evaluation.judges import get_judge
    from cai.evaluation.standard_sets import load_eval_prompts
    from cai.runs import StageDir

    ks = _int_list(prefill_k, "--prefill-k") if prefill_k else []
    harmful = load_eval_prompts(prompts, field, split=split, limit=limit)
    benign_set = load_eval_prompts(benign, benign_field, split=split, limit=benign_limit) if benign else None
    sampling = SamplingParams(max_new_tokens, temperature, 1.0, [], seed, repetition_penalty, stop_loops=stop_loops)
    stage = StageDir(out, "eval")
    stage.begin({"model": model, "prompts": prompts, "field": field, "benign": benign, "benign_field": benign_field,
                 "judge": judge, "split": split, "limit": limit, "benign_limit": benign_limit, "system": system,
                 "prefill": prefill, "sampling": sampling.__dict__}, force=force, run_name=str(out))
    for name, ps in (("harmful", harmful), ("benign", benign_set)):
        for s in (ps.skipped if ps else []):
            stage.skip(f"{name}:line:{s.get('line', '?')}", s.get("reason", "skipped"))
    judge_obj = get_judge(judge)
    backend = get_backend(model, batch_size=batch_size)
    m = evaluate_model(backend, harmful.prompts, benign_set.prompts if benign_set else [], out, judge=judge_obj,
                       sampling=sampling, system_prompt=system, prefill=prefill, label=Path(out).name)
    for s in m["skipped"]:
        stage.skip(s["id"], s["reason"])
    if ks:
        from cai.evaluation.prefill import prefill_attack

        pre = prefill_attack(backend, harmful.prompts, ks, out / "prefill", judge=judge_obj, sampling=sampling,
                             system_prompt=system)
        _print_prefill(pre)
    stage.finish({"harmful": m["n_harmful"], "benign": m["n_benign"], "skipped": len(stage.manifest["skipped"])})
    _print_metrics(m)
    _out().print(f"wrote {out / 'samples.jsonl'} and {out / 'metrics.json'}")


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 0,4,8") from None


def _print_metrics(m: dict) -> None:
    from cai.evaluation.evaluate import format_rate

    t = Table(title=f"{m['model']} — judge {m['judge']} (95% CIs)")
    for c in ("", "harmful compliance", "over-refusal", "loop rate", "mean length (tokens)"):
        t.add_column(c)
    rows = [("all", m)] + sorted(m["per_category"].items())
    for name, r in rows:
        t.add_row(name, format_rate(r.get("harmful_compliance_rate", {})), format_rate(r.get("over_refusal_rate", {})),
                  format_rate(r.get("loop_rate", {})), format_rate(r.get("mean_length", {}), pct=False))
    _out().print(t)


def _print_prefill(pre: dict) -> None:
    from cai.evaluation.evaluate import format_rate

    t = Table(title="prefill attack: attack success rate by prefilled tokens")
    for c in ("k", "prefill", "attack success"):
        t.add_column(c)
    for k, r in sorted(pre["by_k"].items(), key=lambda kv: int(kv[0])):
        t.add_row(k, repr(r["prefill"]), format_rate(r["attack_success_rate"]))
    _out().print(t)


def read_records(path: Path) -> list[dict]:
    """Records of a JSONL / JSON list / CSV file."""
    if not path.is_file():
        raise UserError(f"--input {path}: file not found")
    text = path.read_text(encoding="utf-8-sig")
    try:
        if path.suffix == ".csv":
            return list(csv.DictReader(text.splitlines()))
        if path.suffix == ".json":
            data = json.loads(text)
            if not isinstance(data, list):
                raise UserError(f"--input {path}: expected a JSON list of objects")
            return data
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise UserError(f"--input {path}: invalid JSON at line {exc.lineno} ({exc.msg}); use JSONL, JSON or CSV") from None


def judge_(
    judge: str = typer.Option("refusal", "--judge", help="refusal | reward:<path> | a model spec (LLM judge)."),
    input: Path = typer.Option(..., "--input", "-i", help="JSONL/JSON/CSV file of responses to label."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL: each input record plus a 'judge' object."),
    prompt_field: str = typer.Option("prompt", "--prompt-field"),
    response_field: str = typer.Option("response", "--response-field"),
    label_field: Optional[str] = typer.Option(None, "--label-field", help="Human label (true = refused) to measure "
                                              "the judge's agreement against."),
) -> None:
    """Label an existing file of responses with a judge (and measure agreement with human labels)."""
    from cai.evaluation.judges import get_judge
    from cai.runs import atomic_write_text

    records = read_records(input)
    if not records:
        raise UserError(f"--input {input}: no records")
    for n, r in enumerate(records, 1):
        for f, flag in ((prompt_field, "--prompt-field"), (response_field, "--response-field")):
            if not isinstance(r, dict) or not isinstance(r.get(f), str):
                raise UserError(f"--input {input}: record {n} has no text field {f!r}; pass {flag} NAME")
    j = get_judge(judge)
    labels = j.judge([r[prompt_field] for r in records], [r[response_field] for r in records])
    atomic_write_text(out, "".join(json.dumps({**r, "judge": lab}, ensure_ascii=False) + "\n"
                                   for r, lab in zip(records, labels)))
    refused = sum(lab["refused"] for lab in labels)
    msg = f"wrote {out}: {len(records)} records, {refused} judged refused ({j.name})"
    if label_field:
        truth = [_truthy(r.get(label_field)) for r in records]
        pairs = [(t, lab["refused"]) for t, lab in zip(truth, labels) if t is not None]
        if not pairs:
            raise UserError(f"--label-field {label_field!r}: no record has a true/false value there")
        acc = sum(t == p for t, p in pairs) / len(pairs)
        from cai.evaluation.metrics import proportion_ci

        _, lo, hi = proportion_ci(sum(t == p for t, p in pairs), len(pairs))
        msg += f"; agreement with {label_field}: {100 * acc:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}] on {len(pairs)}"
    _out().print(msg)


def _truthy(v) -> bool | None:
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    return True if s in ("1", "true", "yes", "refused", "refusal") else False if s in (
        "0", "false", "no", "complied", "compliance") else None


def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (runs/<name>)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default: RUN/report, or "
                                       "runs/compare-A-vs-B for several runs)."),
) -> None:
    """Write one self-contained HTML report (plots embedded) and summary.md for one or more runs."""
    from cai.evaluation.report import print_summary, write_report

    target = out or (runs[0] / "report" if len(runs) == 1 else
                     runs[0].parent / ("compare-" + "-vs-".join(r.name for r in runs)))
    path = write_report(runs, target)
    print_summary(runs, path)


def compare(
    run_a: Path = typer.Argument(..., help="First run folder."),
    run_b: Path = typer.Argument(..., help="Second run folder."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/compare-A-vs-B)."),
) -> None:
    """Put two runs side by side (e.g. constitution vs inverted, SL vs RL) in one HTML report."""
    report([run_a, run_b], out)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
    app.command("judge")(judge_)
    app.command("report")(report)
    app.command("compare")(compare)
