"""An experiment's report: ``report.html`` (a self-contained section: table, embedded figures, notes, paired
comparisons) and ``summary.md``."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from cai.experiments.steps import Experiment


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    table = "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return table + "</table>"


def write_report(
    exp: Experiment,
    title: str,
    intro: str,
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    figures: Sequence[Path],
    notes: Sequence[str] = (),
    paired: dict | None = None,
) -> Path:
    """``report.html`` (a self-contained section: table, embedded figures, notes, and the paired comparisons of
    :func:`cai.experiments.steps.paired_between` when given) and ``summary.md``."""
    from cai.evaluation.paired import TABLE_HEADER, table_rows
    from cai.evaluation.report import markdown_table

    table = _html_table(header, rows)
    paired_rows = table_rows(paired) if paired else []
    paired_note = "Same prompts matched by id; difference = rate B − rate A; " + "; ".join(
        f"{k}: {v}" for k, v in (paired or {}).get("method", {}).items()
    )
    imgs = "".join(
        f'<figure><img src="data:image/png;base64,{base64.b64encode(f.read_bytes()).decode()}" '
        f'alt="{html.escape(f.stem)}"><figcaption>{html.escape(f.stem)}</figcaption></figure>'
        for f in figures
        if f.is_file()
    )
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    paired_html = (
        (f"<h3>Paired comparisons</h3>{_html_table(TABLE_HEADER, paired_rows)}" f"<p>{html.escape(paired_note)}</p>")
        if paired_rows
        else ""
    )
    section = (
        f'<section id="{html.escape(exp.kind)}"><h2>{html.escape(title)}</h2><p>{html.escape(intro)}</p>'
        f"{table}{imgs}<ul>{notes_html}</ul>{paired_html}</section>"
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;max-width:60rem;margin:2rem auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}img{max-width:100%}</style></head>"
        f"<body><p>run <code>{html.escape(str(exp.root))}</code></p>{section}</body></html>"
    )
    (exp.root / "report.html").write_text(page, encoding="utf-8")
    md = f"## {title}\n\n{intro}\n\n{markdown_table(header, rows)}\n\n" + "".join(f"- {n}\n" for n in notes)
    if paired_rows:
        md += f"\n### Paired comparisons\n\n{markdown_table(TABLE_HEADER, paired_rows)}\n\n{paired_note}\n"
    (exp.root / "summary.md").write_text(md, encoding="utf-8")
    return exp.root / "report.html"
