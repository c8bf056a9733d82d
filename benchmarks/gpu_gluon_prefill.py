"""The Hopper (Gluon) prefill kernel's tiles on this GPU, against the unified Triton kernel and
flash-attn-4 in the same run: prefill steps of the Llama-3-8B attention shape (bf16, 16-token
blocks), attention of one layer, CUDA-graph replays (median).

    python benchmarks/gpu_gluon_prefill.py [--quick]

Each Gluon tile (``attention.hopper_prefill.GluonTile``: key rows, stages) is
checked against the unified kernel's output first (relative L2 <= 3e-3), then timed. Prints one
markdown table (us per layer; the shipped tile marked) and the best tile per step, to set
``hopper_prefill.TILE`` from. ``--quick``: the shipped tile only.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_attention import D, Inputs, bench, fa4_fn, flash_available, rel_err  # noqa: E402 (puts the repo on sys.path)
from gpu_prefill_tiles import STEPS  # noqa: E402 (the unified kernel's tile sweep times the same steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="the shipped tile only")
    ap.add_argument("--no-flash", action="store_true")
    args = ap.parse_args()
    from attention import hopper_prefill as hp
    from attention.triton_attn import unified_attention

    missing = hp.unavailable_reason("cuda", hp.device_capability(torch.device("cuda")), torch.bfloat16,
                                    torch.bfloat16, D, hp.BLOCK_M)
    if missing:
        sys.exit(missing)
    shipped = hp.TILE
    tiles = [shipped]
    for block_n, stages in itertools.product((64, 128), (2, 3, 4)):
        t = hp.GluonTile(block_n, stages)
        if not args.quick and t not in tiles and (128 + 2 * stages * block_n) * D * 2 <= 227 * 1024:
            tiles.append(t)
    with_flash = flash_available(not args.no_flash)
    scale = D ** -0.5
    inputs = {name: Inputs(q, c, 16, torch.bfloat16) for name, (q, c) in STEPS.items()}

    def run(s: Inputs, kernel: str) -> torch.Tensor:
        return unified_attention(s.q, s.k, s.v, s.kv_cache, s.md, scale, prefill_kernel=kernel)

    base = {name: bench(lambda s=s: run(s, "triton"))[0] * 1e3 for name, s in inputs.items()}
    want = {name: run(s, "triton") for name, s in inputs.items()}
    fa4 = {name: bench(lambda s=s: fa4_fn(s.q, s.kv_cache, s.md, scale))[0] * 1e3 if with_flash else float("nan")
           for name, s in inputs.items()}
    rows = []
    for tile in tiles:
        hp.TILE = tile
        times = []
        for name, s in inputs.items():
            try:
                err = rel_err(run(s, "gluon"), want[name])
                times.append(bench(lambda s=s: run(s, "gluon"))[0] * 1e3 if err <= 3e-3 else float("nan"))
                if err > 3e-3:
                    print(f"{tile} {name}: relative error {err:.2e} against the unified kernel", flush=True)
            except Exception as e:  # noqa: BLE001 - a tile the compiler or the GPU refuses
                print(f"{tile} {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                times.append(float("nan"))
        rows.append((tile, times))
        print(tile, [f"{t:.1f}" for t in times], flush=True)
    hp.TILE = shipped
    print(f"\n### Gluon prefill tiles on {torch.cuda.get_device_name()} (us per layer, bf16, block 16)\n")
    print("| kernel | key rows | stages | " + " | ".join(STEPS) + " |")
    print("|---|---|---|" + "---|" * len(STEPS))
    print("| unified Triton (default tile) | | | " + " | ".join(f"{base[n]:.1f}" for n in STEPS) + " |")
    print("| flash-attn-4 | | | " + " | ".join(f"{fa4[n]:.1f}" for n in STEPS) + " |")
    for tile, times in rows:
        mark = " (shipped)" if tile == shipped else ""
        print(f"| gluon{mark} | {tile.block_n} | {tile.stages} | "
              + " | ".join(f"{t:.1f}" for t in times) + " |")
    for i, name in enumerate(STEPS):
        best = min(rows, key=lambda r: r[1][i] if r[1][i] == r[1][i] else float("inf"))
        print(f"best for {name}: {dataclasses.astuple(best[0])} {best[1][i]:.1f} us "
              f"(shipped {rows[0][1][i]:.1f}, unified {base[name]:.1f}, FA4 {fa4[name]:.1f}; "
              f"shipped / FA4 {rows[0][1][i] / fa4[name]:.2f})")


if __name__ == "__main__":
    main()
