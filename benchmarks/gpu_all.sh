#!/usr/bin/env bash
# Every GPU check and benchmark, in parts that each fit one 10-minute device call:
#   bash benchmarks/gpu_all.sh tests        GPU tests (pytest -m gpu) + attention/sampler tables
#   bash benchmarks/gpu_all.sh throughput   ours vs HF continuous batching (+ roofline)
#   bash benchmarks/gpu_all.sh all          both
# Output goes to $OUT (or ./out) as logs and markdown tables.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"; export OUT PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
part="${1:-all}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -c "import flash_attn.cute" 2>/dev/null && echo "flash-attn-4: yes" || echo "flash-attn-4: no"
if [[ $part == tests || $part == all ]]; then
  python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests -s 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "KV sizing|passed|failed|SKIP|Error" 
  python3 benchmarks/gpu_attention.py --quick 2>&1 | tail -30
  python3 benchmarks/gpu_sampler.py --device cuda 2>&1 | tail -15
  python3 benchmarks/gpu_fused_ops.py 2>&1 | tail -16
fi
if [[ $part == throughput || $part == all ]]; then
  python3 benchmarks/gpu_throughput.py "${@:2}" 2>&1 | tee "$OUT/throughput.log" | grep -v "^\s*$"
fi
