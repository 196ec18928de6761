#!/usr/bin/env bash
# The benchmarks' GPU section in one run (meant to finish in under 8 minutes on one GPU): Gemma-2-2B's real-size
# memory for LoRA, QLoRA, prefix tuning and partial at 1 x 512, then the LLM loop, generation and captioning
# benchmarks on CUDA in bf16. Results: OUTPUT_DIR/*_cuda.md|json (names chosen by the scripts per device).
#   bash launch/bench_gpu.sh [OUTPUT_DIR]          # default results/bench; PYTHON=python3 to use another interpreter
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/bench}
py=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 WANDB_MODE=offline PYTHONUNBUFFERED=1
"$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
  'error: bench_gpu.sh needs a CUDA device (torch.cuda.is_available() is False); the CPU benchmarks are launch/bench_*.py')"
"$py" launch/bench_llm.py --real-size --output-dir "$out"
"$py" launch/bench_llm.py --device cuda --output-dir "$out"
"$py" launch/bench_generate.py --device cuda --output-dir "$out"
"$py" launch/bench_caption.py --device cuda --output-dir "$out"
