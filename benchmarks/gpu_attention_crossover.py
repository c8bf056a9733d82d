"""Measure where flash-attn-4 overtakes Triton per step shape, and write the crossover table.

    python benchmarks/gpu_attention_crossover.py [--quick] [--block-size 16]

Times the composite backend ("auto": Triton decode rows, flash-attn-4 prefill rows) under each
forced route - the whole step on Triton, the whole step on flash-attn-4, and split - over a
grid of step shapes on the Llama-3-8B attention shape (32/8 heads, d=128, bf16): prefill-only
steps (rows of L tokens over C cached, ~8k tokens a step), mixed steps (B decodes over 4k
context plus prefill rows) and pure decode (B x context; graphs always take Triton there, shown
for the record). Each time is the forward of one layer (KV write + attention; the split's
gathers included), median of CUDA-graph replays. The thresholds are fitted with
``attention.crossovers.fit_crossover`` and the table with this GPU family's entry replaced is
written to $OUT/crossovers.json (copy it to attention/crossovers.json to keep it); markdown
tables go to stdout and $OUT/crossover.md, raw timings to $OUT/crossover_timings.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_attention import D, HKV, HQ, Inputs, bench  # noqa: E402 (also puts the repo on sys.path)

from attention.composite import AutoAttentionBackend  # noqa: E402
from attention.crossovers import (TABLE_PATH, StepShape, choose_route, family_key,  # noqa: E402
                                  fit_crossover)

ROUTE_NAMES = {"decode": "triton", "prefill": "FA4", "split": "split"}


def time_routes(q_lens: list[int], ctx: list[int], block_size: int, routes: tuple[str, ...]) -> dict:
    """Median ms per layer forward for each route, over rotated inputs (KV beyond L2)."""
    kv_bytes = sum(q + c for q, c in zip(q_lens, ctx)) * HKV * D * 2 * 2
    sets = [Inputs(q_lens, ctx, block_size, torch.bfloat16, seed=i)
            for i in range(max(1, min(8, math.ceil(256e6 / kv_bytes))))]
    times = {}
    for route in routes:
        cls = type(f"Forced_{route}", (AutoAttentionBackend,), {"route_override": route})
        be = cls(HQ, HKV, D, D ** -0.5)
        mds = [cls.prepare(s.md) for s in sets]
        assert mds[0].extra.route == route, (route, mds[0].extra.route)
        it = {"i": 0}

        def fn() -> None:
            i = it["i"] % len(sets)
            it["i"] += 1
            be(sets[i].q, sets[i].k, sets[i].v, sets[i].kv_cache, mds[i])

        times[route] = bench(fn)[0]
    del sets
    torch.accelerator.empty_cache()
    return times


def grid(quick: bool) -> dict[str, list[tuple[str, list[int], list[int]]]]:
    tokens = 8192
    prefill = []
    for L in ((64, 512, 2048, 8192) if quick else (16, 64, 256, 1024, 2048, 4096, 8192)):
        for C in ((0, 8192) if quick else (0, 1024, 8192)):
            n = max(1, min(64, tokens // L))
            prefill.append((f"{n} x {L} over {C}", [L] * n, [C] * n))
    mixed = []
    for B in ((8, 128) if quick else (1, 8, 32, 128)):
        for L in ((512, 4096) if quick else (64, 512, 2048, 4096)):
            n = max(1, (tokens - B) // L)
            mixed.append((f"{B} dec + {n} x {L}", [1] * B + [L] * n, [4095] * B + [0] * n))
    decode = [(f"{B} x {c}", [1] * B, [c - 1] * B)
              for B in ((1, 64) if quick else (1, 16, 64, 256)) for c in (1024, 8192)]
    return {"prefill": prefill, "mixed": mixed, "decode": decode}


def _flash_version() -> str:
    from importlib import metadata
    for dist in ("flash-attn-4", "flash-attn", "flash_attn"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "?"


def shape_of(q_lens: list[int]) -> StepShape:
    pre = [q for q in q_lens if q >= 2]
    return StepShape(q_lens.count(1), sum(pre), len(pre))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller grid (a few minutes less)")
    ap.add_argument("--block-size", type=int, default=16)
    args = ap.parse_args()
    if not torch.accelerator.is_available():
        sys.exit("needs a CUDA GPU")
    reason = AutoAttentionBackend.unsupported_reason("cuda", torch.bfloat16, D, args.block_size)
    if reason:
        sys.exit(f"the auto backend cannot run here: {reason}")
    import triton
    family = family_key(torch.device("cuda"))
    if family is None:
        sys.exit("the GPU's compute capability is unknown (triton's driver did not say): no table key")
    gpu = torch.cuda.get_device_name()
    t0 = time.time()
    lines = [f"# Attention crossovers on {gpu} ({family}), block size {args.block_size}", "",
             "Per-layer forward (KV write + attention), Llama-3-8B attention shape, bf16, "
             "median of CUDA-graph replays, us.", ""]
    cases, raw = [], []
    for kind, rows in grid(args.quick).items():
        routes = ("decode", "prefill") if kind != "mixed" else ("decode", "prefill", "split")
        lines += [f"## {kind}", "", "| step | " + " | ".join(ROUTE_NAMES[r] + " us" for r in routes)
                  + " | best |", "|---" * (len(routes) + 2) + "|"]
        for label, q_lens, ctx in rows:
            times = time_routes(q_lens, ctx, args.block_size, routes)
            best = min(times, key=times.get)
            lines.append(f"| {label} | " + " | ".join(f"{times[r] * 1e3:.1f}" for r in routes)
                         + f" | {ROUTE_NAMES[best]} {max(times.values()) / times[best]:.2f}x |")
            print(lines[-1], flush=True)
            shape = shape_of(q_lens)
            raw.append(dict(kind=kind, step=label, shape=vars(shape), ms=times))
            if kind != "decode":  # pure decode is always Triton (the captured graphs)
                cases.append((shape, times))
        lines.append("")
    date = datetime.date.today().isoformat()
    source = (f"kernel timings: benchmarks/gpu_attention_crossover.py{' --quick' if args.quick else ''} "
              f"on {gpu}, {date}, block {args.block_size}, Llama-3-8B attention shape bf16; torch "
              f"{torch.__version__}, triton {triton.__version__}, flash-attn {_flash_version()}")
    xo = fit_crossover(cases, source)
    hits = sum(choose_route(s, xo) == min(t, key=t.get) for s, t in cases)
    slow = max(t[choose_route(s, xo)] / min(t.values()) for s, t in cases)
    lines += ["## Fit", "", f"prefill_min_query_len = {xo.prefill_min_query_len}, "
              f"split_min_decode_tokens = {xo.split_min_decode_tokens}: the best route in "
              f"{hits}/{len(cases)} shapes, worst {slow:.2f}x the best.", ""]
    with open(TABLE_PATH) as f:
        table = json.load(f)
    table[family] = dict(decode="triton", prefill="flash", prefill_min_query_len=xo.prefill_min_query_len,
                         split_min_decode_tokens=xo.split_min_decode_tokens, source=source)
    text = json.dumps(table, indent=2) + "\n"
    lines += ["New table (copy $OUT/crossovers.json to attention/crossovers.json):", "", "```json",
              text.rstrip(), "```", "", f"Total {time.time() - t0:.0f}s."]
    print("\n".join(lines))
    out = os.environ.get("OUT")
    if out:
        for name, content in (("crossovers.json", text), ("crossover.md", "\n".join(lines) + "\n"),
                              ("crossover_timings.json", json.dumps(raw, indent=1))):
            with open(os.path.join(out, name), "w") as f:
                f.write(content)


if __name__ == "__main__":
    main()
