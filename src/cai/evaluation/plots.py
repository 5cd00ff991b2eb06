"""Matplotlib figures: for the run report, returned as base64 PNG strings (embedded, no external files); for the
experiment reports, rates with 95% CIs saved as PNG files (:func:`bar_plot`, :func:`line_plot`)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from cai.evaluation.metrics import HEADLINE_RATES


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_b64(fig) -> str:
    """Render and close a figure; return its PNG as base64."""
    plt = pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _err(r: dict, scale: float = 100) -> tuple[float, float, float]:
    v, lo, hi = (r.get(k, math.nan) for k in ("rate", "ci_low", "ci_high"))
    return scale * v, scale * max(0.0, v - lo), scale * max(0.0, hi - v)


def metric_bars(rows: Sequence[tuple[str, dict]]) -> str:
    """Grouped bars with 95% CI whiskers: the headline rates (``HEADLINE_RATES``) per checkpoint."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 3.2))
    width = 0.8 / len(HEADLINE_RATES)
    for j, (k, name) in enumerate(HEADLINE_RATES):
        vals = [_err(m.get(k, {})) for _, m in rows]
        xs = [i + (j - (len(HEADLINE_RATES) - 1) / 2) * width for i in range(len(rows))]  # centred on the tick
        ax.bar(
            xs, [v[0] for v in vals], width, yerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=3, label=name
        )
    ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=15, ha="right")
    ax.set_ylabel("% of prompts (95% CI)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, 1.18))
    return to_b64(fig)


def harm_help(points: Sequence[tuple[str, float, float, float, float, float, float]], xlabel: str, ylabel: str) -> str:
    """Scatter of (name, x, x_lo, x_hi, y, y_lo, y_hi) with CI error bars: harmlessness vs helpfulness."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 4))
    for name, x, xlo, xhi, y, ylo, yhi in points:
        ax.errorbar(
            [x],
            [y],
            xerr=[[max(0, x - xlo)], [max(0, xhi - x)]],
            yerr=[[max(0, y - ylo)], [max(0, yhi - y)]],
            fmt="o",
            capsize=3,
            label=name,
        )
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return to_b64(fig)


def curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str = "step") -> str:
    """Line plot of named (x, y) series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return to_b64(fig)


def panels(panels: Sequence, title: str) -> str:
    """One axis per metric family (training_curves.Panel: title, ylabel, series with an optional band), up to three
    per row, so no axis mixes quantities on different scales."""
    plt = pyplot()
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.0 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for s in panel.series:
            (line,) = ax.plot(s.x, s.y, marker="." if len(s.x) < 40 else None, label=s.label)
            if s.band is not None:
                lo, hi, band_label = s.band
                ax.fill_between(s.x, lo, hi, color=line.get_color(), alpha=0.2, label=band_label)
        ax.set_title(panel.title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1 or any(s.band for s in panel.series):
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return to_b64(fig)


def histogram(values: Sequence[float], title: str, xlabel: str, bins: int = 20) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 2.8))
    ax.hist(values, bins=bins, range=(0, 1), color="#4a7ab5")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    return to_b64(fig)


# ---- rates with CIs, saved as files (experiment reports) ---------------------------------------------------------
def _yerr(rates: Sequence[dict]) -> list[list[float]]:
    """Error-bar lengths in percentage points; clipped at 0 because a Wilson bound at a rate of 0 or 1 can land a
    rounding error on the wrong side of it (0 with ci_low 7e-18 at n = 50), which matplotlib rejects."""
    return [
        [max(0.0, 100 * (r["rate"] - r["ci_low"])) for r in rates],
        [max(0.0, 100 * (r["ci_high"] - r["rate"])) for r in rates],
    ]


def bar_plot(
    path: Path, title: str, groups: Sequence[str], series: dict[str, Sequence[dict]], ylabel: str = "rate (%)"
) -> Path:
    """Grouped bars of rates with 95% CI error bars, saved as a PNG: one group per row label, one bar per series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(groups) + 2), 3.6))
    width = 0.8 / max(1, len(series))
    for s, (label, rates) in enumerate(series.items()):
        xs = [g + (s - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [100 * r["rate"] for r in rates], width, yerr=_yerr(rates), capsize=3, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=15, ha="right")
    ax.set_ylim(0, 105)
    return save_figure(plt, fig, ax, path, title, ylabel)


def line_plot(
    path: Path,
    title: str,
    xs: Sequence[float],
    series: dict[str, Sequence[dict]],
    xlabel: str,
    ylabel: str = "rate (%)",
) -> Path:
    """Rates against ``xs`` with shaded 95% CIs, one line per series, saved as a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, rates in series.items():
        ax.plot(xs, [100 * r["rate"] for r in rates], marker="o", label=label)
        ax.fill_between(xs, [100 * r["ci_low"] for r in rates], [100 * r["ci_high"] for r in rates], alpha=0.15)
    ax.set_xticks(list(xs))
    ax.set_ylim(0, 105)
    ax.set_xlabel(xlabel)
    return save_figure(plt, fig, ax, path, title, ylabel)


def save_figure(plt, fig, ax, path: Path, title: str, ylabel: str) -> Path:
    """Label, lay out and save a plot (the shared tail of every plot the experiments write)."""
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
