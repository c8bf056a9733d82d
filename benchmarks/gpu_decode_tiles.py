"""The Triton decode kernel's tiles on this GPU: every (key tile, warps, stages) that fits in
shared memory, timed on pure-decode steps of the Llama-3-8B attention shape (bf16 queries, 16-token
blocks, a bf16 or fp8 cache), with the KV bandwidth each reaches (K+V bytes read over kernel time).

    python benchmarks/gpu_decode_tiles.py [--quick] [--kv-dtype fp8]

Prints one markdown table (us per layer, median of CUDA-graph replays; the default's row marked)
and the best tile per step, to tune ``attention.triton_tiles.decode_config`` from.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_attention import D, HKV, HQ, Inputs, bench  # noqa: E402 (also puts the repo on sys.path)

# name -> per-request context before the decoded token (the mixed workload's tail: 256 rows of 512-640)
_rng = np.random.default_rng(0)
STEPS = {"256 x 512-640": [int(c) for c in _rng.integers(512, 640, 256)], "128 x 1k": [1024] * 128,
         "64 x 4k": [4096] * 64, "8 x 8k": [8192] * 8, "1 x 16k": [16384]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the default tile only")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16", help="the cache's dtype")
    args = ap.parse_args()
    from attention.triton_attn import unified_attention
    from attention.triton_tiles import TileConfig, _smem_limit, decode_config, fit_shared_memory

    dev = torch.device("cuda")
    smem, g = _smem_limit(dev), HQ // HKV
    scale = D ** -0.5
    kv_dtype = torch.float8_e4m3fn if args.kv_dtype == "fp8" else torch.bfloat16
    kv_elem = torch.empty(0, dtype=kv_dtype).element_size()
    default = fit_shared_memory(decode_config(g, D, torch.bfloat16), D, 2, smem)
    tiles = [default]
    for block_n, warps, stages in itertools.product((32, 64, 128, 256), (2, 4, 8), (2, 3, 4, 5)):
        if args.quick:
            break
        cfg = TileConfig(default.block_m, 1, block_n, warps, stages)
        if (cfg.block_m * 2 + 2 * stages * block_n * kv_elem) * D + 1024 <= (smem or 1 << 30) and cfg not in tiles:
            tiles.append(cfg)
    inputs = {name: Inputs([1] * len(ctx), ctx, 16, torch.bfloat16) for name, ctx in STEPS.items()}
    for s in inputs.values():
        s.kv_cache = s.kv_cache.to(kv_dtype)  # randn: well inside fp8's range
    kv_bytes = {name: 2 * HKV * D * kv_elem * (sum(ctx) + len(ctx)) for name, ctx in STEPS.items()}
    rows = []
    for cfg in tiles:
        times = []
        for s in inputs.values():
            try:
                ms, _ = bench(lambda s=s: unified_attention(s.q, s.k, s.v, s.kv_cache, s.md, scale,
                                                            configs=(cfg, None)))
            except Exception as e:  # noqa: BLE001 - a tile the compiler refuses
                print(f"{cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                ms = float("nan")
            times.append(1e3 * ms)
        rows.append((cfg, times))
        print(cfg, [f"{t:.1f}" for t in times], flush=True)
    print(f"\n### Triton decode tiles on {torch.cuda.get_device_name()} (us per layer, {args.kv_dtype} cache, block 16; "
          f"TB/s of K+V read)\n")
    print("| block_n | warps | stages | " + " | ".join(STEPS) + " |")
    print("|---|---|---|" + "---|" * len(STEPS))
    for cfg, times in rows:
        mark = " (default)" if cfg == default else ""
        print(f"| {cfg.block_n}{mark} | {cfg.num_warps} | {cfg.num_stages} | "
              + " | ".join(f"{t:.1f} ({kv_bytes[n] / t / 1e6:.2f})" for n, t in zip(STEPS, times)) + " |")
    for i, name in enumerate(STEPS):
        best = min(rows, key=lambda r: r[1][i] if r[1][i] == r[1][i] else float("inf"))
        print(f"best for {name}: {best[0]} {best[1][i]:.1f} us (default {rows[0][1][i]:.1f})")


if __name__ == "__main__":
    main()
