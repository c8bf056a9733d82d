"""Can a Triton GEMM beat cuBLAS on a decode step's projections? The Llama-3-8B shapes at decode
batch rows (240 and 256 by default), cuBLAS (``F.linear``) against the best of a sweep of TMA
tiles (block M x N x K, stages, warps) and split-K (fp32 atomics, the zeroing and the final cast
timed in): us per GEMM, median of CUDA-graph replays, TFLOP/s in brackets.

    python benchmarks/gpu_gemm_triton.py [240,256]

On an H200 (2026-12-01) cuBLAS won or tied every shape but o_proj (Triton 14.1 vs 15.5 us):
the decode steps' GEMMs are not held back by cuBLAS's kernels.
"""
from __future__ import annotations

import itertools
import sys
import time

import torch
import triton
import triton.language as tl
import triton.testing as tt
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def mm(a_desc, b_desc, c_desc, c_ptr, M, N, K, split_k, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
       ATOMIC: tl.constexpr, STAGES: tl.constexpr):
    """``C = A B^T`` (A ``[M, K]``, B ``[N, K]``, bf16): one output tile per program, K split in
    ``split_k`` ranges whose fp32 partials ATOMIC adds into ``c_ptr``."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    tile = pid % (num_m * num_n)
    s = pid // (num_m * num_n)
    pid_m = tile % num_m
    pid_n = tile // num_m
    k_tiles = tl.cdiv(K, BK)
    per = tl.cdiv(k_tiles, split_k)
    lo = s * per
    hi = tl.minimum(lo + per, k_tiles)
    acc = tl.zeros((BM, BN), tl.float32)
    for k in tl.range(lo, hi, num_stages=STAGES):
        a = a_desc.load([pid_m * BM, k * BK])
        b = b_desc.load([pid_n * BN, k * BK])
        acc = tl.dot(a, b.T, acc)
    if ATOMIC:
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        ptrs = c_ptr + rm[:, None] * N + rn[None, :]
        tl.atomic_add(ptrs, acc, mask=(rm[:, None] < M) & (rn[None, :] < N), sem="relaxed")
    else:
        c_desc.store([pid_m * BM, pid_n * BN], acc.to(tl.bfloat16))


def make(x: torch.Tensor, w: torch.Tensor, BM: int, BN: int, BK: int, STAGES: int, warps: int, split: int):
    """A closure computing ``x @ w.T`` with this tile (the split-K zeroing and cast included)."""
    M, K = x.shape
    N = w.shape[0]
    out = torch.empty(M, N, dtype=torch.bfloat16, device=x.device)
    acc32 = torch.empty(M, N, dtype=torch.float32, device=x.device) if split > 1 else out
    a_d = TensorDescriptor.from_tensor(x, [BM, BK])
    b_d = TensorDescriptor.from_tensor(w, [BN, BK])
    c_d = TensorDescriptor.from_tensor(out, [BM, BN])
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN) * split,)

    def run():
        if split > 1:
            acc32.zero_()
        mm[grid](a_d, b_d, c_d, acc32, M, N, K, split, BM=BM, BN=BN, BK=BK, ATOMIC=split > 1, STAGES=STAGES,
                 num_warps=warps)
        if split > 1:
            out.copy_(acc32)
        return out
    return run


SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def configs():
    for BM, BN in itertools.product((64, 128), (64, 128, 256)):
        warps = 4 if BM == 64 else 8
        for BK, stages in ((64, 3), (64, 4), (64, 5), (128, 2), (128, 3)):
            if (BM + BN) * BK * 2 * stages > 220 * 1024:
                continue
            yield BM, BN, BK, stages, warps


def main():
    rows = [int(r) for r in (sys.argv[1] if len(sys.argv) > 1 else "240,256").split(",")]
    torch.manual_seed(0)
    t0 = time.time()
    print(f"### Triton TMA GEMM vs cuBLAS on {torch.cuda.get_device_name()}\n")
    print("| proj | M | cuBLAS us (TFLOP/s) | best Triton us (TFLOP/s) | config (BM,BN,BK,stages,warps,split) | top-3 |")
    print("|---|---|---|---|---|---|")
    tot_cublas = tot_triton = 0.0
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        for m in rows:
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            ref = torch.nn.functional.linear(x, w)
            cub = tt.do_bench_cudagraph(lambda: torch.nn.functional.linear(x, w), rep=30, return_mode="median") * 1e3
            res = []
            for cfg in configs():
                for split in ((1, 2, 4) if n <= 8192 else (1,)):
                    try:
                        fn = make(x, w, *cfg, split)
                        out = fn()
                        torch.cuda.synchronize()
                        err = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                        if err > 1e-2:
                            print(f"  bad {name} {m} {cfg} {split}: err {err}")
                            continue
                        us = tt.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
                        res.append((us, cfg + (split,)))
                    except Exception as e:  # noqa: BLE001
                        print(f"  fail {name} {m} {cfg} {split}: {type(e).__name__} {str(e)[:80]}")
            res.sort()
            best = res[0]
            fl = 2 * m * n * k
            tot_cublas += cub
            tot_triton += min(best[0], cub)
            print(f"| {name} | {m} | {cub:.1f} ({fl / cub / 1e6:.0f}) | {best[0]:.1f} ({fl / best[0] / 1e6:.0f}) | "
                  f"{best[1]} | {', '.join(f'{u:.1f}' for u, _ in res[1:3])} |", flush=True)
    print(f"\nsum cuBLAS {tot_cublas:.1f} us, sum min(cuBLAS, Triton) {tot_triton:.1f} us; {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
