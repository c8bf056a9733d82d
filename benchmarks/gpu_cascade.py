"""Cascade attention on the GPU: the kernel, then the shared-prefix workload with it off and on.

    python benchmarks/gpu_cascade.py [--runs 2] [--skip-kernels] [--skip-e2e] [--kv-dtype fp8]

(a) Kernels: one layer's attention (Llama-3-8B shape, bf16 queries over a bf16 or, with
``--kv-dtype fp8``, an fp8 cache, block 16) for decode batches whose requests share a prompt
prefix and have 64 keys of their own, plain vs cascade (the prefix split as
``prefix_cascade_plan`` says, and forced to 1-8 splits), CUDA-graph replays, median us, and the
cascade's error against the plain kernel.
(b) End to end: the shared-prefix workload of ``gpu_throughput.py`` (256 requests x (1024 shared +
64) prompt tokens -> 64), Triton attention, async scheduling, decode graphs (cascade steps replay
cascade graphs). Cascades are on when the engine starts (so their graphs are captured) and
switched off per run through ``TritonAttentionBackend.cascade_min_tokens``, runs alternating
off/on on one engine (best of ``--runs`` each); prints total tok/s, % of the floor, how many
steps took a cascade and whether greedy tokens were equal (with random weights near-ties make
some differ: the kernel table's error is the exactness check).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gpu_attention import Inputs, bench, rel_err  # noqa: E402
from benchmarks.gpu_throughput import (LLAMA3_8B, WORKLOADS, floor_seconds, make_prompts,  # noqa: E402
                                       measure_roofline, timed_greedy, warm_up)


def kernels(kv_dtype: torch.dtype = torch.bfloat16) -> None:
    import attention.triton_attn as ta
    scale, plan = 128 ** -0.5, ta.prefix_cascade_plan
    print("| decode batch | shared keys | plain us | cascade us (splits) | 1 split | 2 | 4 | 8 | rel. err vs plain |")
    print("|---|---|---|---|---|---|---|---|---|")
    for batch in (64, 256):
        for shared in (1024, 4096):
            s = Inputs([1] * batch, [shared + 63] * batch, 16, torch.bfloat16, seed=1)
            s.kv_cache = s.kv_cache.to(kv_dtype)  # randn: well inside fp8's range
            pages = shared // 16
            s.md.block_table[:batch, :pages] = s.md.block_table[0, :pages].clone()
            dev = torch.tensor([shared], dtype=torch.int32, device="cuda")
            plain = s.md
            casc = dataclasses.replace(plain, shared_prefix_len=shared, shared_prefix=dev, cascade_prefix_len=shared)
            cells = [f"{bench(lambda: ta.unified_attention(s.q, s.k, s.v, s.kv_cache, plain, scale))[0] * 1e3:.1f}"]
            out = ta.unified_attention(s.q, s.k, s.v, s.kv_cache, casc, scale)
            err = rel_err(out, ta.unified_attention(s.q, s.k, s.v, s.kv_cache, plain, scale))
            chosen = plan(ta.decode_config(4, 128, torch.bfloat16), 4, batch, 8, 128, 2, ta._smem_limit(dev.device),
                          ta._sm_count(dev.device))[1]
            for forced in (None, 1, 2, 4, 8):
                if forced is not None:
                    ta.prefix_cascade_plan = lambda *a, f=forced: (plan(*a)[0], f)
                t = bench(lambda: ta.unified_attention(s.q, s.k, s.v, s.kv_cache, casc, scale))[0] * 1e3
                ta.prefix_cascade_plan = plan
                cells.append(f"{t:.1f}" + (f" ({chosen})" if forced is None else ""))
            print(f"| {batch} | {shared} | " + " | ".join(cells) + f" | {err:.1e} |", flush=True)
            del s
            torch.cuda.empty_cache()


def end_to_end(runs: int, profile: bool = False) -> None:
    from attention.triton_attn import CASCADE_MIN_TOKENS, TritonAttentionBackend
    from engine import LLM, SamplingParams

    steps = [0]  # cascade steps (prepare's decision)
    prepare = TritonAttentionBackend.prepare.__func__

    def counted(cls, md):
        out = prepare(cls, md)
        steps[0] += out.cascade_prefix_len > 0
        return out
    TritonAttentionBackend.prepare = classmethod(counted)
    bw, flops = measure_roofline()
    n_req, plen, olen, shared = WORKLOADS["shared-prefix"]
    # start-up with and without cascade graphs (the first start also pays the compiles); the
    # last engine stays, with its cascade graphs
    for i, min_tokens in enumerate((CASCADE_MIN_TOKENS, 0, CASCADE_MIN_TOKENS)):
        TritonAttentionBackend.cascade_min_tokens = min_tokens
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump(LLAMA3_8B, f)
            llm = LLM(model=d, device="cuda", dtype="bfloat16", load_format="dummy", max_model_len=4096,
                      max_num_seqs=256, max_num_batched_tokens=8192, attention_backend="triton")
        graphs = llm.runner.graphs
        print(f"start-up, cascades {'on' if min_tokens else 'off'}: {time.perf_counter() - t0:.1f} s, "
              f"{len(graphs.full)} decode graphs + {len(graphs.cascade)} cascade graphs", flush=True)
        if i < 2:
            llm.shutdown()
            del llm, graphs
            torch.cuda.empty_cache()
    warm_up(llm, {"shared-prefix": WORKLOADS["shared-prefix"]})
    prompts = make_prompts("shared-prefix", n_req, plen, shared)
    floor = floor_seconds(LLAMA3_8B, n_req, plen, olen, shared, bw, flops, prefix_cached=True)
    best: dict[str, float] = {}
    tokens: dict[str, list] = {}
    for _ in range(runs):
        for mode in ("off", "on"):
            TritonAttentionBackend.cascade_min_tokens = CASCADE_MIN_TOKENS if mode == "on" else 0
            steps[0] = 0
            outs, dt, n_out = timed_greedy(llm, prompts, olen)
            best[mode] = max(best.get(mode, 0.0), (sum(map(len, prompts)) + n_out) / dt)
            tokens[mode] = [o.outputs[0].token_ids for o in outs]
            print(f"cascade {mode}: {(sum(map(len, prompts)) + n_out) / dt:,.0f} tok/s total, "
                  f"{steps[0]} cascade steps", flush=True)
    if profile:
        from benchmarks.profile_run import profile_generate
        profile_generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True),
                         "cascade", reset=llm.scheduler.reset_prefix_cache)
    llm.shutdown()
    total = sum(map(len, prompts)) + n_req * olen
    agree = sum(a == b for a, b in zip(tokens["on"], tokens["off"]))
    print(f"\nGPU: {torch.cuda.get_device_name()}; copy {bw / 1e12:.2f} TB/s; shared-prefix {n_req} x ({shared} + "
          f"{plen}) -> {olen}; greedy outputs equal on/off: {agree} of {n_req}\n")
    print("| cascade | total tok/s (% of floor) |\n|---|---|")
    for mode in ("off", "on"):
        print(f"| {mode} | {best[mode]:,.0f} ({100 * floor * best[mode] / total:.0f}%) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--skip-kernels", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16", help="the kernel table's cache dtype")
    ap.add_argument("--profile", action="store_true",
                    help="also one run with cascades under the profilers: GPU busy vs wall, top host functions")
    args = ap.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}; kernel table: {args.kv_dtype} cache", flush=True)
    if not args.skip_kernels:
        kernels(torch.float8_e4m3fn if args.kv_dtype == "fp8" else torch.bfloat16)
    if not args.skip_e2e:
        end_to_end(args.runs, args.profile)


if __name__ == "__main__":
    main()
