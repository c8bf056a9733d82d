"""The Triton prefill kernel's tiles on this GPU: every (query rows, key tile, warps, stages) that fits
in shared memory, with the new K/V rows read by pointers and by tensor descriptors, timed on prefill
steps of the Llama-3-8B attention shape (bf16, 16-token blocks).

    python benchmarks/gpu_prefill_tiles.py [--new-kv rows,desc] [--quick]

Prints one markdown table (us per layer, median of CUDA-graph replays; the current default's row
marked) and the best tile per step, to tune ``attention.triton_tiles.prefill_config`` from.
``--quick`` times the default tile only.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_attention import D, HKV, HQ, Inputs, bench  # noqa: E402 (also puts the repo on sys.path)

STEPS = {"2k over 0": ([2048], [0]), "2k over 8k": ([2048], [8192]), "8k over 0": ([8192], [0]),
         "8k over 8k": ([8192], [8192]), "16 x 512 over 0": ([512] * 16, [0] * 16)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-kv", default="rows,desc", help="how the new K/V rows are read: rows, desc")
    ap.add_argument("--quick", action="store_true", help="the default tile only")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated steps of {list(STEPS)}")
    args = ap.parse_args()
    modes = args.new_kv.split(",")
    steps = {name: STEPS[name] for name in args.steps.split(",")}
    from attention.triton_attn import unified_attention
    from attention.triton_tiles import TileConfig, _smem_limit, fit_shared_memory, prefill_config

    dev = torch.device("cuda")
    smem, g = _smem_limit(dev), HQ // HKV
    scale = D ** -0.5
    default = fit_shared_memory(prefill_config(g, D, torch.bfloat16, 2048), D, 2, smem)
    tiles = [default]
    for block_m, block_n, warps, stages in itertools.product((64, 128, 256), (64, 128), (4, 8), (2, 3, 4)):
        if args.quick:
            break
        cfg = TileConfig(block_m, block_m // g, block_n, warps, stages)
        if (block_m + 2 * stages * block_n) * D * 2 + 1024 <= (smem or 1 << 30) and cfg not in tiles:
            tiles.append(cfg)
    inputs = {name: Inputs(q, c, 16, torch.bfloat16) for name, (q, c) in steps.items()}
    rows = []
    for cfg, mode in itertools.product(tiles, modes):
        times = []
        for s in inputs.values():
            try:
                ms, _ = bench(lambda s=s: unified_attention(s.q, s.k, s.v, s.kv_cache, s.md, scale,
                                                            configs=(None, cfg), new_kv=mode))
            except Exception as e:  # noqa: BLE001 - a tile the compiler refuses
                print(f"{cfg} {mode}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                ms = float("nan")
            times.append(1e3 * ms)
        rows.append((cfg, mode, times))
        print(cfg, mode, [f"{t:.1f}" for t in times], flush=True)
    print(f"\n### Triton prefill tiles on {torch.cuda.get_device_name()} (us per layer, bf16, block 16)\n")
    print("| block_m (q x heads) | block_n | warps | stages | new K/V | " + " | ".join(steps) + " |")
    print("|---|---|---|---|---|" + "---|" * len(steps))
    for cfg, mode, times in rows:
        mark = " (default)" if cfg == default else ""
        print(f"| {cfg.block_m}{mark} | {cfg.block_n} | {cfg.num_warps} | {cfg.num_stages} | {mode} | "
              + " | ".join(f"{t:.1f}" for t in times) + " |")
    for i, name in enumerate(steps):
        best = min(rows, key=lambda r: r[2][i] if r[2][i] == r[2][i] else float("inf"))
        print(f"best for {name}: {best[0]} {best[1]} {best[2][i]:.1f} us (default {rows[0][2][i]:.1f})")


if __name__ == "__main__":
    main()
