"""Stage ``report``: the run's self-contained HTML report + summary.md, and the one-screen summary table."""

from __future__ import annotations

from typing import Any


def run(ctx) -> dict[str, Any]:
    from cai.evaluation.report import print_summary, write_report

    path = write_report([ctx.run.root], ctx.stage.path)
    ctx.stage.finish({"report": str(path)})
    if ctx.progress:
        print_summary([ctx.run.root], path)
    return {"report": str(path)}
