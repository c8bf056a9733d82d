#!/usr/bin/env bash
# Every GPU check and benchmark, in parts that each fit one 10-minute device call:
#   bash benchmarks/gpu_all.sh tests        GPU tests (pytest -m gpu) + attention/sampler tables
#   bash benchmarks/gpu_all.sh throughput   ours vs HF continuous batching (+ roofline)
#   bash benchmarks/gpu_all.sh tp           two GPUs: all-reduce latency, TP=1 vs TP=2 (8B), 70B at TP=2
#   bash benchmarks/gpu_all.sh piecewise    piecewise vs simple graphs: startup, then workloads (8B shape)
#   bash benchmarks/gpu_all.sh crossover    attention crossovers (writes $OUT/crossovers.json), block sizes,
#                                           the attention table with the prefix gather against paged reads,
#                                           the Hopper (Gluon) prefill tiles against the unified kernel and FA4
#   bash benchmarks/gpu_all.sh attention    throughput workloads with triton, flash and auto (one table);
#                                           the shared-prefix workload with cascade attention off and on
#   bash benchmarks/gpu_all.sh async        async scheduling off/on, mixed steps by kind; then on with an fp8 KV cache
#   bash benchmarks/gpu_all.sh kernels      the projections' GEMMs (cuBLAS ways, a Triton tile sweep), the decode
#                                           kernel's tiles and the cascade kernels over a bf16 and an fp8 cache
#   bash benchmarks/gpu_all.sh all          tests and throughput
# Output goes to $OUT (or ./out) as logs and markdown tables.
set -uo pipefail
# Shared hosts: never NVLink multicast (it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
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
  python3 benchmarks/gpu_gemv.py --e2e 2>&1 | grep -v -i warn | tail -12
fi
if [[ $part == throughput || $part == all ]]; then
  python3 benchmarks/gpu_throughput.py "${@:2}" 2>&1 | tee "$OUT/throughput.log" | grep -v "^\s*$"
fi
if [[ $part == piecewise ]]; then
  python3 benchmarks/gpu_piecewise.py "${@:2}" 2>&1 | tee "$OUT/piecewise.log" | grep -E "^\||^#|plans|greedy|failed|Error"
fi
if [[ $part == crossover ]]; then
  python3 benchmarks/gpu_attention_crossover.py 2>&1 | tee "$OUT/crossover.log" | grep -v "^\s*$"
  python3 benchmarks/gpu_block_size.py 2>&1 | tee "$OUT/block_size.log" | grep -v -i warn | tail -12
  python3 benchmarks/gpu_attention.py --skip-correctness --gather-sweep 2>&1 | tee "$OUT/attention_gather.log" \
    | grep -E "^\||GATHER"
  python3 benchmarks/gpu_gluon_prefill.py 2>&1 | tee "$OUT/gluon_prefill.log" | grep -E "^\||^best"
fi
if [[ $part == attention ]]; then
  python3 benchmarks/gpu_attention_e2e.py "${@:2}" 2>&1 | tee "$OUT/attention_e2e.log" | grep -v "^\s*$"
  python3 benchmarks/gpu_cascade.py 2>&1 | tee "$OUT/cascade.log" | grep -E "^\||cascade|GPU:"
fi
if [[ $part == async ]]; then
  python3 benchmarks/gpu_async.py --decode-len 2048 --steps mixed 2>&1 | tee "$OUT/async.log" | grep -E "^\||GPU:|^mixed"
  python3 benchmarks/gpu_async.py --decode-len 2048 --steps mixed --modes on --kv-cache-dtype fp8 2>&1 \
    | tee "$OUT/async_fp8.log" | grep -E "^\||GPU:|^mixed"
fi
if [[ $part == kernels ]]; then
  python3 benchmarks/gpu_gemm.py 2>&1 | tee "$OUT/gemm.log" | grep -E "^\||^#"
  python3 benchmarks/gpu_gemm_triton.py 2>&1 | tee "$OUT/gemm_triton.log" | grep -E "^\||^#|^sum"
  for kv in bf16 fp8; do
    python3 benchmarks/gpu_decode_tiles.py --kv-dtype $kv 2>&1 | tee "$OUT/decode_tiles_$kv.log" | grep -E "^\||^#|^best"
    python3 benchmarks/gpu_cascade.py --skip-e2e --kv-dtype $kv 2>&1 | tee "$OUT/cascade_kernels_$kv.log" | grep -E "^\||GPU"
  done
fi
if [[ $part == tp ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/distributed/test_one_shot_gpu.py tests/workers/test_tp_gpu.py -s 2>&1 | tee "$OUT/tp_tests.log" | grep -E "bf16|passed|failed"
  python3 benchmarks/gpu_tp.py allreduce 2>&1 | tee "$OUT/tp_allreduce.log" | grep "|"
  python3 benchmarks/gpu_tp.py 8b 2>&1 | tee "$OUT/tp_8b.log" | grep -v -i warn | tail -14
  python3 benchmarks/gpu_tp.py 70b 2>&1 | tee "$OUT/tp_70b.log" | grep -v -i warn | tail -8
fi
