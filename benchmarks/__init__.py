"""What `cai bench` runs: side-by-side throughput measurements on one model, written to JSON and
docs/performance.md. Each module defines ``NAME``, ``run(ctx) -> dict`` (with ``rows`` for the table) and
``NOTE`` (what the figure means, and why a target can be missed)."""
