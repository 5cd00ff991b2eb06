"""What `cai bench` runs: side-by-side throughput measurements on one model, written to JSON and Markdown
(docs/performance.md in a checkout). Each of generation, labels, critique and sft defines ``NAME``,
``run(ctx) -> dict`` (with ``rows`` for the table) and ``NOTE`` (what the figure means, and why a target can be
missed). eval_speed, guard_bench and guard_load are standalone scripts: ``python -m cai.bench.<name> --help``."""
