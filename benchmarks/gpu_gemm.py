"""The projections' GEMMs of the Llama-3-8B shape on this GPU, as the engine's steps give them
(a prefill chunk of ~8k tokens, a decode batch of up to 256 rows), against the bf16 rate of an
8192^3 matmul measured in the same run, and against alternative ways of asking cuBLAS for the
same product: the cuBLASLt entry point, the weight stored transposed (``x @ w_t``), and the row
count padded to a multiple of 128.

    python benchmarks/gpu_gemm.py

Prints one markdown table (us per GEMM, median of CUDA-graph replays, and TFLOP/s).
"""
from __future__ import annotations

import torch
import triton.testing as tt

PROJ = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (7836, 7936, 8192, 256, 240, 128)


def timed(fn) -> float:
    return tt.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3  # us


def main() -> None:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    peak = 2 * 8192 ** 3 / timed(lambda: a @ a) / 1e6  # TFLOP/s
    del a
    print(f"### GEMMs on {torch.cuda.get_device_name()} (bf16; 8192^3 runs at {peak:.0f} TFLOP/s)\n")
    print("| proj | M | F.linear us (TFLOP/s) | cuBLASLt us | x @ w_t us | M padded to 128: us |")
    print("|---|---|---|---|---|---|")
    for name, (n, k) in PROJ.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        w_t = w.t().contiguous()
        for m in ROWS:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            xp = torch.randn(-(-m // 128) * 128, k, dtype=torch.bfloat16, device="cuda")
            base = timed(lambda: torch.nn.functional.linear(x, w))
            torch.backends.cuda.preferred_blas_library("cublaslt")
            lt = timed(lambda: torch.nn.functional.linear(x, w))
            torch.backends.cuda.preferred_blas_library("cublas")
            tr = timed(lambda: x @ w_t)
            pad = timed(lambda: torch.nn.functional.linear(xp, w))
            print(f"| {name} | {m} | {base:.1f} ({2 * m * n * k / base / 1e6:.0f}) | {lt:.1f} | {tr:.1f} | "
                  f"{pad:.1f} |", flush=True)


if __name__ == "__main__":
    main()
