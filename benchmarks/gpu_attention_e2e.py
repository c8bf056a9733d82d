"""End to end, per attention backend: the four throughput workloads with Triton only, flash-attn-4
only and the per-step choice ("auto"), in one run and one table.

    python benchmarks/gpu_attention_e2e.py [--backends triton,flash,auto] [--decode-len 2048] [--only mixed,...]

Our engine as ``gpu_throughput.py --engine ours`` runs it (Llama-3-8B shape, random bf16 weights,
greedy, ``max_num_batched_tokens=8192``, decode CUDA graphs), once per backend, one after the
other in this process. Prints total tok/s per workload and backend (output tok/s for mixed), and
auto against the better single backend; writes $OUT/attention_e2e.md when OUT is set.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_throughput import LLAMA3_8B, WORKLOADS, run_ours  # noqa: E402
from report import publish  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backends", default="triton,flash,auto")
    ap.add_argument("--decode-len", type=int, default=2048, help="decode-heavy output length")
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--only", default=None, help="comma-separated workload names (default: all four)")
    args = ap.parse_args()
    backends = args.backends.split(",")
    workloads = dict(WORKLOADS)
    workloads["decode-heavy"] = (128, 32, args.decode_len, 0)
    if args.only:
        unknown = set(args.only.split(",")) - set(workloads)
        if unknown:
            sys.exit(f"unknown workloads {sorted(unknown)}; choose from {sorted(workloads)}")
        workloads = {k: v for k, v in workloads.items() if k in args.only.split(",")}
    results = {}
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA3_8B, f)
        for b in backends:
            run_args = argparse.Namespace(max_batched_tokens=args.max_batched_tokens, attention_backend=b, tp=1)
            results[b] = run_ours(d, workloads, run_args)
    metric = {name: "output_tps" if name == "mixed" else "total_tps" for name in workloads}
    singles = [b for b in backends if b != "auto"]
    lines = ["| workload | " + " | ".join(f"{b} tok/s" for b in backends)
             + (" | auto / best single |" if "auto" in backends and singles else " |"),
             "|---" * (len(backends) + 1 + ("auto" in backends and bool(singles))) + "|"]
    for name, (n, p, o, s) in workloads.items():
        vals = {b: results[b][name][metric[name]] for b in backends}
        row = f"| {name} ({n} x {s}+{p} -> {o}, {metric[name].split('_')[0]}) | " + " | ".join(
            f"{vals[b]:,.0f}" for b in backends)
        if "auto" in backends and singles:
            best = max(singles, key=vals.get)
            row += f" | {vals['auto'] / vals[best]:.3f} (vs {best})"
        lines.append(row + " |")
    publish("\n".join(lines), "attention_e2e.md")


if __name__ == "__main__":
    main()
