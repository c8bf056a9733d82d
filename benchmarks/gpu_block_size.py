"""Block size per attention backend: Triton and flash-attn-4 kernels at 16/32/64/128-token blocks,
and the prefix-cache hit rate of the shared-prefix workload at each - one markdown table.

    python benchmarks/gpu_block_size.py [--no-flash] [--skip-hit-rate]

Kernels (Llama-3-8B attention shape, bf16, paged inputs with shuffled blocks, median of CUDA-graph
replays; ``gpu_attention._time_case``): decode 64 x 4k and 1 x 16k context, prefill 2k over 0 and
over 8k cached. Hit rate: ``gpu_throughput.py``'s shared-prefix workload (256 x (1024 shared + 64)
-> 64 tokens) through our engine (Llama-3-8B shape, random weights, eager), cached prompt tokens /
prompt tokens (``RequestOutput.num_cached_tokens``); 1024 is a multiple of every block size, so the
same workload with a 1000-token prefix shows what coarser blocks cost (only full blocks are shared).
Writes $OUT/block_size.md when OUT is set.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_attention import _time_case, flash_available  # noqa: E402 (also puts the repo on sys.path)
from gpu_throughput import LLAMA3_8B, WORKLOADS, make_prompts  # noqa: E402
from report import publish  # noqa: E402

BLOCK_SIZES = (16, 32, 64, 128)
PREFIXES = (1024, 1000)  # shared prefix tokens: the workload's, and one that is no block multiple
SHAPES = [("decode 64 x 4k", [1] * 64, [4095] * 64), ("decode 1 x 16k", [1], [16383]),
          ("prefill 2k over 0", [2048], [0]), ("prefill 2k over 8k", [2048], [8192])]


def hit_rate(model_dir: str, block_size: int, shared: int) -> float:
    """Cached / prompt tokens of the shared-prefix workload (with ``shared`` prefix tokens) at
    this block size."""
    from engine import LLM, SamplingParams

    n_req, plen, olen, _ = WORKLOADS["shared-prefix"]
    prompts = make_prompts("shared-prefix", n_req, plen, shared)
    with LLM(model=model_dir, device="cuda", dtype="bfloat16", load_format="dummy", max_model_len=2048,
             max_num_seqs=256, max_num_batched_tokens=8192, block_size=block_size, enforce_eager=True,
             attention_backend="triton") as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True),
                            use_tqdm=False)
    gc.collect()
    torch.accelerator.empty_cache()
    return sum(o.num_cached_tokens for o in outs) / sum(map(len, prompts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--no-flash", action="store_true", help="skip the flash-attn-4 columns")
    ap.add_argument("--skip-hit-rate", action="store_true", help="kernels only (no engine runs)")
    args = ap.parse_args()
    if not torch.accelerator.is_available():
        sys.exit("needs a CUDA GPU")
    with_flash = flash_available(not args.no_flash)
    t0 = time.time()
    rows: dict[int, dict[str, tuple[float, float]]] = {}
    for bs in BLOCK_SIZES:
        rows[bs] = {}
        for label, q_lens, ctx in SHAPES:
            _, t_tri, t_fa, *_ = _time_case(label, q_lens, ctx, bs, 128 ** -0.5, with_flash)
            rows[bs][label] = (t_tri, t_fa)
            print(f"block {bs} {label}: triton {t_tri * 1e3:.1f} us, FA4 {t_fa * 1e3:.1f} us", flush=True)
    rates: dict[tuple[int, int], float] = {}
    if not args.skip_hit_rate:
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(LLAMA3_8B, f)
            for bs in BLOCK_SIZES:
                for shared in PREFIXES:
                    rates[bs, shared] = hit_rate(d, bs, shared)
                    print(f"block {bs}: shared-prefix ({shared}) hit rate {rates[bs, shared]:.1%}", flush=True)
    head = " | ".join(f"{label} triton / FA4 us" for label, *_ in SHAPES)
    lines = [f"# Block size per backend on {torch.cuda.get_device_name()}", "",
             "Kernel us: median of CUDA-graph replays (KV write excluded), Llama-3-8B attention "
             "shape, bf16. Hit rate: shared-prefix workload (256 x (shared + 64) -> 64), cached "
             "/ prompt tokens.", "",
             f"| block | {head} | " + " | ".join(f"hit rate, {p} shared" for p in PREFIXES) + " |",
             "|---" * (len(SHAPES) + len(PREFIXES) + 1) + "|"]
    for bs in BLOCK_SIZES:
        cells = " | ".join(f"{t * 1e3:.1f} / {tf * 1e3:.1f}" for t, tf in rows[bs].values())
        rate = " | ".join(f"{rates[bs, p]:.1%}" if (bs, p) in rates else "-" for p in PREFIXES)
        lines.append(f"| {bs} | {cells} | {rate} |")
    best = {label: (min(BLOCK_SIZES, key=lambda b: rows[b][label][0]),
                    min(BLOCK_SIZES, key=lambda b: rows[b][label][1]) if with_flash else None)
            for label, *_ in SHAPES}
    lines += ["", "Fastest block: " + "; ".join(f"{label}: triton {t}" + (f", FA4 {f}" if f else "")
                                                 for label, (t, f) in best.items()),
              f"\nTotal {time.time() - t0:.0f}s."]
    publish("\n".join(lines), "block_size.md")


if __name__ == "__main__":
    main()
