"""Where one step's time goes on a GPU: host vs device, and the top kernels (torch.profiler).

    python benchmarks/gpu_profile_step.py [--batch 128] [--ctx 1024] [--shared 0] [--backend flash] [--top 12] [--cascade]
    torchrun --nproc-per-node 2 benchmarks/gpu_profile_step.py --tp 2 ...   # tensor parallel, rank 0 prints

Llama-3-8B-shaped random bf16 weights (as gpu_throughput.py). Times (a) decode steps at ``--batch``
requests of ``--ctx`` context (after ``--shared`` tokens of a prefix they all share) through the
engine loop, (b) one 8k-token prefill step, and prints
per step: wall time, GPU kernel time, host time not covered by kernels, and the top kernels.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.gpu_throughput import LLAMA3_8B, make_prompts


def kernel_table(prof, steps: int, top: int = 12) -> tuple[float, str]:
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events) / steps / 1e3
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    rows = [f"  {e.self_device_time_total / steps / 1e3:8.3f} ms  {e.count // steps:4d}x  {e.key[:90]}"
            for e in events[:top]]
    return total, "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--backend", default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shared", type=int, default=0, help="tokens of a prefix every prompt shares")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per table")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (> 1: start with torchrun)")
    ap.add_argument("--cascade", action="store_true", help="Triton cascade attention on (shared prefixes)")
    ap.add_argument("--eager", action="store_true", help="enforce_eager (no CUDA graphs)")
    ap.add_argument("--cprofile", type=int, default=0, help="also list the top N host functions (cProfile)")
    args = ap.parse_args()
    if args.cascade:
        from attention.triton_attn import CASCADE_MIN_TOKENS, TritonAttentionBackend
        TritonAttentionBackend.cascade_min_tokens = CASCADE_MIN_TOKENS
    if int(os.environ.get("RANK", "0")) != 0:  # other ranks run the same steps silently
        global print
        print = lambda *a, **k: None  # noqa: E731
    from engine import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA3_8B, f)
        llm = LLM(model=d, device="cuda", dtype="bfloat16", load_format="dummy", max_model_len=4096 + 16,
                  max_num_seqs=256, max_num_batched_tokens=8192, attention_backend=args.backend,
                  tensor_parallel_size=args.tp, enforce_eager=args.eager,
                  distributed_executor_backend="external_launcher" if args.tp > 1 else None)
    sched, runner = llm.scheduler, llm.runner
    print(f"backend {runner.attn_backend.name}, graphs {sorted(runner.graphs.full)[-3:]}")
    prompts = make_prompts("profile", args.batch, args.ctx, args.shared)
    from engine.request import Request

    for i, p in enumerate(prompts):
        sched.add_request(Request(f"p{i}", p, SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running) or sched.waiting:
        so = sched.schedule()
        sched.update_from_output(so, runner.execute_model(so))

    def step() -> None:
        so = sched.schedule()
        sched.update_from_output(so, runner.execute_model(so))

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall = (time.perf_counter() - t) / args.steps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
    gpu, top = kernel_table(prof, args.steps, args.top)
    if args.cprofile:
        import cProfile

        from benchmarks.profile_run import host_table
        cp = cProfile.Profile()
        cp.enable()
        for _ in range(args.steps):
            step()
        cp.disable()
        print(f"\n## host functions of {args.steps} decode steps (cProfile)\n{host_table(cp, args.cprofile)}")
    print(f"\n## decode, batch {args.batch}, context ~{args.ctx + args.shared}: wall {wall:.2f} ms/step, "
          f"GPU kernels {gpu:.2f} ms/step, not covered {wall - gpu:.2f} ms\n{top}")
    # host-only cost of one step: everything but waiting for the GPU
    so = sched.schedule()
    t = time.perf_counter()
    runner._update_states(so)
    inputs = runner._prepare_inputs(so)
    t_prep = time.perf_counter() - t
    hidden = runner._forward(inputs)
    torch.cuda.synchronize()
    print(f"host: _update_states+_prepare_inputs {t_prep * 1e3:.2f} ms")
    t = time.perf_counter()
    md = runner.sampling_state.prepare(inputs.sample_rows)
    print(f"host: sampling prepare {(time.perf_counter() - t) * 1e3:.2f} ms")
    del hidden, md
    for r in list(sched.running):
        sched.finish_requests(r.request_id, r.status.__class__.FINISHED_ABORTED)
    runner.execute_model(sched.schedule())
    # one 8k-token prefill step
    for i, p in enumerate(make_prompts("prefill", 2, 4096, 0)):
        sched.add_request(Request(f"f{i}", p, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)))
    so = sched.schedule()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        sched.update_from_output(so, runner.execute_model(so))
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) * 1e3
    gpu, top = kernel_table(prof, 1, args.top)
    print(f"\n## prefill step of {so.total_num_scheduled_tokens} tokens: wall {wall:.1f} ms, "
          f"GPU kernels {gpu:.1f} ms\n{top}")


if __name__ == "__main__":
    main()
