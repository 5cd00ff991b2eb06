"""`cai eval`, `cai judge`, `cai report`, `cai compare`: thin wrappers over cai.evaluation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from cai.errors import UserError


def _out() -> Console:
    return Console(highlight=False)


def eval_(
    model: str = typer.Option("smollm2-135m", "--model", "-m", help="Model spec (see `cai models`)."),
    prompts: str = typer.Option(
        ...,
        "--prompts",
        "-p",
        help="Harmful prompts: file, bundled name, hf:<dataset> or "
        "bench:<name>[:<file>] (advbench, harmbench, xstest, donotanswer, hh-redteam).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: samples.jsonl, metrics.json, manifest.json."),
    field: str | None = typer.Option(None, "--field", help="Field holding the harmful prompt text."),
    benign: str | None = typer.Option(None, "--benign", help="Benign prompts (for the over-refusal rate)."),
    benign_field: str | None = typer.Option(None, "--benign-field", help="Field holding the benign prompt text."),
    judge: str = typer.Option("refusal", "--judge", help="refusal | reward:<path> | a model spec (LLM judge)."),
    count_partial: bool = typer.Option(
        False,
        "--count-partial",
        help="Count 'partial' verdicts as harmful " "compliance (metrics.json names the verdicts it counted).",
    ),
    split: str | None = typer.Option(None, "--split", help="Keep only prompts of this split (e.g. eval)."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="First N harmful prompts."),
    benign_limit: int | None = typer.Option(None, "--benign-limit", min=1, help="First N benign prompts."),
    system: str | None = typer.Option(None, "--system", help="System prompt."),
    prefill: str | None = typer.Option(None, "--prefill", help="Start every assistant turn with this text."),
    prefill_k: str | None = typer.Option(
        None,
        "--prefill-k",
        help="Also run the prefill attack for these k " "(comma-separated token counts, e.g. 0,4,8) into OUT/prefill.",
    ),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", min=0.01),
    batch_size: int = typer.Option(
        16,
        "--batch-size",
        min=1,
        help="Prompts per generation batch (in-process " "models; 64 suits the 135M default on a CPU).",
    ),
    stop_loops: bool = typer.Option(
        True,
        "--stop-loops/--no-stop-loops",
        help="End an answer once it is a " "degenerate repetition (finish_reason loop, labelled a loop).",
    ),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Random seed (0 to 2^32-1)."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto | float32 | bfloat16 | float16 | int8 (CPU: dynamic int8 weights, faster)."
    ),
    force: bool = typer.Option(False, "--force", help="Recompute even if OUT holds results made with other settings."),
) -> None:
    """Answer harmful (and benign) prompts, judge every answer, and report rates with 95% CIs."""
    from cai.backends import SamplingParams, get_backend
    from cai.evaluation.evaluate import evaluate_model
    from cai.evaluation.judges import get_judge
    from cai.evaluation.standard_sets import load_eval_prompts
    from cai.models import check_dtype_flag
    from cai.runs import StageDir

    check_dtype_flag(dtype)  # before the output folder is made
    ks = _int_list(prefill_k, "--prefill-k") if prefill_k else []
    harmful = load_eval_prompts(prompts, field, split=split, limit=limit)
    benign_set = load_eval_prompts(benign, benign_field, split=split, limit=benign_limit) if benign else None
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        seed=seed,
        repetition_penalty=repetition_penalty,
        stop_loops=stop_loops,
    )
    stage = StageDir(out, "eval")
    stage.begin(
        {
            "model": model,
            "prompts": prompts,
            "field": field,
            "benign": benign,
            "benign_field": benign_field,
            "judge": judge,
            "split": split,
            "limit": limit,
            "benign_limit": benign_limit,
            "system": system,
            "prefill": prefill,
            "sampling": sampling.__dict__,
            "count_partial": count_partial,
            **({"dtype": dtype} if dtype != "auto" else {}),  # omitted at its default: earlier folders keep their hash
        },
        force=force,
        run_name=str(out),
        elsewhere="another --out folder for a separate run",
    )
    for name, ps in (("harmful", harmful), ("benign", benign_set)):
        for s in ps.skipped if ps else []:
            stage.skip(f"{name}:line:{s.get('line', '?')}", s.get("reason", "skipped"))
    judge_obj = get_judge(judge)
    backend = get_backend(model, batch_size=batch_size, dtype=dtype)
    m = evaluate_model(
        backend,
        harmful.prompts,
        benign_set.prompts if benign_set else [],
        out,
        judge=judge_obj,
        sampling=sampling,
        system_prompt=system,
        prefill=prefill,
        label=Path(out).name,
        count_partial=count_partial,
    )
    for s in m["skipped"]:
        stage.skip(s["id"], s["reason"])
    if ks:
        from cai.evaluation.prefill import prefill_attack

        pre = prefill_attack(
            backend, harmful.prompts, ks, out / "prefill", judge=judge_obj, sampling=sampling, system_prompt=system
        )
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
        t.add_row(
            name,
            format_rate(r.get("harmful_compliance_rate", {})),
            format_rate(r.get("over_refusal_rate", {})),
            format_rate(r.get("loop_rate", {})),
            format_rate(r.get("mean_length", {}), pct=False),
        )
    _out().print(t)


def _print_prefill(pre: dict) -> None:
    from cai.evaluation.evaluate import format_rate

    t = Table(title="prefill attack: attack success rate by prefilled tokens")
    for c in ("k", "prefill", "attack success"):
        t.add_column(c)
    for k, r in sorted(pre["by_k"].items(), key=lambda kv: int(kv[0])):
        t.add_row(k, repr(r["prefill"]), format_rate(r["attack_success_rate"]))
    _out().print(t)


def read_located_records(path: Path, flag: str = "--input") -> list[tuple[str, object]]:
    """``(where, record)`` for each record of a JSONL / JSON list / CSV file; ``where`` is ``line N`` (JSONL, CSV:
    the file's line) or ``item N`` (JSON list), for error messages. Records are not checked to be objects."""
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found")
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        return [(f"line {reader.line_num}", row) for row in reader]
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{flag} {path}: invalid JSON at line {exc.lineno} ({exc.msg}); use JSONL, JSON or CSV"
            ) from None
        if not isinstance(data, list):
            raise UserError(f"{flag} {path}: expected a JSON list of objects")
        return [(f"item {i}", r) for i, r in enumerate(data, 1)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"line {n}", json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{flag} {path}: invalid JSON at line {n} ({exc.msg}); use JSONL, JSON or CSV") from None
    return out


def judge_(
    judge: str = typer.Option("refusal", "--judge", help="refusal | reward:<path> | a model spec (LLM judge)."),
    input: Path = typer.Option(..., "--input", "-i", help="JSONL/JSON/CSV file of responses to label."),
    out: Path = typer.Option(..., "--out", "-o", help="Output JSONL: each input record plus a 'judge' object."),
    prompt_field: str = typer.Option("prompt", "--prompt-field"),
    response_field: str = typer.Option("response", "--response-field"),
    label_field: str | None = typer.Option(
        None,
        "--label-field",
        help="Human label to measure the judge "
        "against: a verdict (complied, refused, partial, non_responsive), "
        "true/false (= refused or not), or any label --label-map maps.",
    ),
    label_map: str | None = typer.Option(
        None,
        "--label-map",
        help="Map the dataset's labels onto verdicts: "
        "'1_full_compliance=complied,2_full_refusal=refused,3_partial_refusal="
        "partial' or a JSON/YAML file with that mapping (labels compared as "
        "strings, e.g. 1=complied,0=refused).",
    ),
) -> None:
    """Label an existing file of responses with a judge; with --label-field, measure it against human labels
    (confusion matrix, per-class precision/recall/F1 and accuracy with 95% CIs; OUT's side: *.agreement.json)."""
    from cai.evaluation.agreement import map_label, parse_label_map
    from cai.evaluation.judges import get_judge
    from cai.evaluation.metrics import VERDICTS
    from cai.runs import atomic_write_text

    if label_map and not label_field:
        raise UserError("--label-map needs --label-field (the field holding the labels to map)")
    mapping = parse_label_map(label_map) if label_map else None
    located = read_located_records(input)
    if not located:
        raise UserError(f"--input {input}: no records (the file is empty)")
    human: list = []
    for where, r in located:
        if not isinstance(r, dict):
            raise UserError(
                f"--input {input} {where}: expected an object with fields {prompt_field!r} and " f"{response_field!r}"
            )
        for f, flag in ((prompt_field, "--prompt-field"), (response_field, "--response-field")):
            if not isinstance(r.get(f), str):
                raise UserError(f"--input {input} {where}: record has no text field {f!r}; pass {flag} NAME")
        if label_field:
            if r.get(label_field) is None or r.get(label_field) == "":
                raise UserError(
                    f"--input {input} {where}: no label in field {label_field!r} (--label-field); "
                    "label every record or drop the unlabelled ones"
                )
            h = map_label(r[label_field], mapping)
            if h is None:
                raise UserError(
                    f"--input {input} {where}: label {r[label_field]!r} in field {label_field!r} is not in "
                    f"--label-map (labels: {', '.join(mapping)})"
                    if mapping is not None
                    else f"--input {input} {where}: label {r[label_field]!r} in field {label_field!r} is neither a "
                    f"verdict ({', '.join(VERDICTS)}) nor true/false; map it with --label-map LABEL=VERDICT,..."
                )
            human.append(h)
    records = [r for _, r in located if isinstance(r, dict)]  # all of them: each was checked to be an object above
    j = get_judge(judge)
    labels = j.judge([r[prompt_field] for r in records], [r[response_field] for r in records])
    atomic_write_text(
        out,
        "".join(
            json.dumps({**r, "judge": lab}, ensure_ascii=False) + "\n" for r, lab in zip(records, labels, strict=False)
        ),
    )
    refused = sum(bool(lab["refused"]) for lab in labels)
    msg = f"wrote {out}: {len(records)} records, {refused} judged refused ({j.name})"
    if label_field:
        _agreement(input, out, j.name, label_field, mapping, human, labels, msg)
    else:
        _out().print(msg)


def agreement_path(out: Path) -> Path:
    """Where `cai judge` writes the agreement report: beside OUT, ``judged.jsonl`` -> ``judged.agreement.json``."""
    return out.with_name(out.stem + ".agreement.json") if out.suffix else out.with_name(out.name + ".agreement.json")


def _agreement(
    input: Path,
    out: Path,
    judge_name: str,
    label_field: str,
    mapping: dict | None,
    human: list,
    labels: list[dict],
    msg: str,
) -> None:
    from cai.evaluation.agreement import agreement, format_share
    from cai.evaluation.metrics import verdict_of
    from cai.runs import write_json

    rep = agreement(human, [verdict_of(lab) for lab in labels])
    path = agreement_path(out)
    write_json(
        path,
        {
            "input": str(input),
            "judge": judge_name,
            "label_field": label_field,
            "label_map": mapping,
            "n": len(human),
            **rep,
        },
    )
    console = _out()
    for view, title in (("verdict", "4-way verdict"), ("binary", "refused vs not")):
        r = rep[view]
        if r is None:
            console.print(
                f"(no 4-way view: the labels in {label_field!r} are true/false, not verdicts; "
                "pass --label-map to map them onto verdicts)",
                soft_wrap=True,
            )
            continue
        cm = Table(title=f"{title}: rows = human ({label_field}), columns = judge ({judge_name})")
        cm.add_column("human \\ judge")
        for c in r["classes"]:
            cm.add_column(c, justify="right")
        for c, row in zip(r["classes"], r["matrix"], strict=False):
            cm.add_row(c, *[str(x) for x in row])
        console.print(cm)
        pc = Table(title=f"{title}: per class (95% CIs)")
        for c in ("class", "support", "precision", "recall", "F1"):
            pc.add_column(c)
        for c, s in r["per_class"].items():
            pc.add_row(
                c, str(s["support"]), format_share(s["precision"]), format_share(s["recall"]), format_share(s["f1"])
            )
        console.print(pc)
        console.print(f"{title} accuracy: {format_share(r['accuracy'])} on {r['n']}", soft_wrap=True)
    acc = rep["binary"]["accuracy"]
    console.print(msg, soft_wrap=True)
    console.print(
        f"agreement with {label_field}: {100 * acc['value']:.1f}% [{100 * acc['ci_low']:.1f}–"
        f"{100 * acc['ci_high']:.1f}] on {acc['n']} (refused vs not)",
        soft_wrap=True,
    )
    console.print(f"wrote {path}", soft_wrap=True)


def report(
    runs: list[Path] = typer.Argument(..., help="Run folders (runs/<name>)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder (default: RUN/report, or " "runs/compare-A-vs-B for several runs)."
    ),
) -> None:
    """Write one self-contained HTML report (plots embedded) and summary.md for one or more runs."""
    from cai.evaluation.report import print_summary, write_report

    target = out or (
        runs[0] / "report" if len(runs) == 1 else runs[0].parent / ("compare-" + "-vs-".join(r.name for r in runs))
    )
    path = write_report(runs, target)
    print_summary(runs, path)


def compare(
    run_a: Path = typer.Argument(..., help="First run folder."),
    run_b: Path = typer.Argument(..., help="Second run folder."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output folder (default runs/compare-A-vs-B)."),
) -> None:
    """Put two runs side by side (e.g. constitution vs inverted, SL vs RL) in one HTML report."""
    report([run_a, run_b], out)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_)
    app.command("judge")(judge_)
    app.command("report")(report)
    app.command("compare")(compare)
