"""Cascade attention on the shared-prefix workload: the same engine with cascades off and on.

    python benchmarks/gpu_cascade.py [--runs 2]

Llama-3-8B shape, random bf16 weights, Triton attention, async scheduling; the shared-prefix
workload of ``gpu_throughput.py`` (256 requests x (1024 shared + 64) prompt tokens -> 64). Cascades
are switched per run through ``TritonAttentionBackend.cascade_min_tokens`` (0 = off, else
``CASCADE_MIN_TOKENS``) on one engine, runs alternating off/on (best of ``--runs`` each); prints
total tok/s, % of the floor, how many steps took a cascade, and whether greedy tokens were equal.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gpu_throughput import LLAMA3_8B, WORKLOADS, floor_seconds, make_prompts, measure_roofline, warm_up  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    args = ap.parse_args()
    import attention.triton_attn as ta
    from attention.triton_attn import CASCADE_MIN_TOKENS, TritonAttentionBackend
    from engine import LLM, SamplingParams

    launches = [0]  # cascade launches (one per layer of a cascade step)
    plan = ta.prefix_cascade_plan

    def counted(*a):
        launches[0] += 1
        return plan(*a)
    ta.prefix_cascade_plan = counted

    bw, flops = measure_roofline()
    n_req, plen, olen, shared = WORKLOADS["shared-prefix"]
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA3_8B, f)
        llm = LLM(model=d, device="cuda", dtype="bfloat16", load_format="dummy", max_model_len=4096,
                  max_num_seqs=256, max_num_batched_tokens=8192, attention_backend="triton")
    warm_up(llm, {"shared-prefix": WORKLOADS["shared-prefix"]})
    prompts = make_prompts("shared-prefix", n_req, plen, shared)
    floor = floor_seconds(LLAMA3_8B, n_req, plen, olen, shared, bw, flops, prefix_cached=True)
    best: dict[str, float] = {}
    tokens: dict[str, list] = {}
    for _ in range(args.runs):
        for mode in ("off", "on"):
            TritonAttentionBackend.cascade_min_tokens = CASCADE_MIN_TOKENS if mode == "on" else 0
            launches[0] = 0
            llm.scheduler.reset_prefix_cache()
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True),
                                use_tqdm=False)
            dt = time.perf_counter() - t
            n_out = sum(len(o.outputs[0].token_ids) for o in outs)
            best[mode] = max(best.get(mode, 0.0), (sum(map(len, prompts)) + n_out) / dt)
            tokens[mode] = [o.outputs[0].token_ids for o in outs]
            print(f"cascade {mode}: {(sum(map(len, prompts)) + n_out) / dt:,.0f} tok/s total, "
                  f"{launches[0] // LLAMA3_8B['num_hidden_layers']} cascade steps", flush=True)
    llm.shutdown()
    total = sum(map(len, prompts)) + n_req * olen
    agree = sum(a == b for a, b in zip(tokens["on"], tokens["off"]))
    print(f"\nGPU: {torch.cuda.get_device_name()}; copy {bw / 1e12:.2f} TB/s; shared-prefix {n_req} x ({shared} + "
          f"{plen}) -> {olen}; greedy outputs equal on/off: {agree} of {n_req}\n")
    print("| cascade | total tok/s (% of floor) |\n|---|---|")
    for mode in ("off", "on"):
        print(f"| {mode} | {best[mode]:,.0f} ({100 * floor * best[mode] / total:.0f}%) |")


if __name__ == "__main__":
    main()
