"""Async scheduling: the same workloads with ``async_scheduling`` off and on, in one run, on one GPU
or, with ``--tp N``, on N GPUs of this host (the ``"mp"`` executor: a worker process per rank).

    python benchmarks/gpu_async.py [--attention-backend triton] [--decode-len 512] [--tp 2] [--steps mixed]
        [--workloads mixed] [--repeat 1] [--kv-cache-dtype fp8] [--max-batched-tokens 8192]

Llama-3-8B shape, random bf16 weights (``load_format="dummy"``). Per mode: bs=1 decode tok/s
(against the bandwidth roofline), decode-heavy total tok/s, mixed output tok/s and shared-prefix
total tok/s, each with its % of the floor of ``gpu_throughput.py``; and, on one GPU, the device's
idle time between decode steps at batch 1 and 128 (CUDA events, no profiler: see ``idle_between_steps``).
Each timed run logs the Triton kernels compiled inside it (there should be none). Prints a
markdown table.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import tempfile
import time
from typing import Iterator

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gpu_throughput import (LLAMA3_8B, WORKLOADS, floor_seconds, make_prompts,  # noqa: E402
                                       measure_roofline, timed_greedy, warm_up)
from benchmarks.gpu_tp import _bs1, params_of  # noqa: E402


def idle_between_steps(llm, batch: int, out_tokens: int = 256, skip: int = 16) -> tuple[float, float]:
    """(wall ms, device-idle ms) per decode step of ``batch`` requests (32-token prompts).

    An event is recorded on the device stream just before each step is launched and just after;
    no device work is queued between one step's end event and the next step's start event, so
    the time between them is how long the device sat idle waiting for the host to launch the next
    step (about 0 when the host runs ahead). Idle gaps inside a step (its few launches around
    the decode graph) are not counted. One process only (the runner must be in this process)."""
    from engine import SamplingParams

    runner = llm.runner
    launch = runner.execute_model_async
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def timed_launch(scheduler_output):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        handle = launch(scheduler_output)
        end.record()
        events.append((start, end))
        return handle

    runner.execute_model_async = timed_launch
    try:
        prompts = make_prompts(f"idle{batch}", batch, 32, 0)
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=out_tokens, ignore_eos=True), use_tqdm=False)
        wall = time.perf_counter() - t
    finally:
        del runner.execute_model_async  # back to the class's method
    torch.cuda.synchronize()
    steady = events[skip:-skip]  # decode steps only: not the prefill nor the draining tail
    idle = [a[1].elapsed_time(b[0]) for a, b in zip(steady, steady[1:])]
    return 1e3 * wall / len(events), sum(idle) / len(idle)


def step_breakdown(llm, prompts: list, params, bw: float, flops: float) -> list[str]:
    """Markdown rows: the run's steps in classes (prefill-bearing vs decode-only), each with its
    device ms (the span between one step's launch and the next: with async scheduling the device
    never idles between steps) against that class's own roofline (each step: the larger of its
    weight + KV bytes over ``bw`` and its GEMM + attention FLOPs over ``flops``). Shows which
    kind of step separates a workload from its floor. One GPU, one process."""
    cfg = LLAMA3_8B
    h, L, kvh, hd = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    qh, vocab = cfg["num_attention_heads"], cfg["vocab_size"]
    body = params_of(cfg) - 2 * vocab * h  # params every token multiplies (not the embedding, lm_head)
    kv_tok = 2 * L * kvh * hd * 2
    runner = llm.runner
    launch = runner.execute_model_async
    steps: list[tuple[torch.cuda.Event, int, int, float, float]] = []
    computed: dict[str, int] = {}  # req -> tokens computed before this step

    def timed_launch(so):
        for r in so.scheduled_new_reqs:
            computed[r.req_id] = r.num_computed_tokens
        for rid, n in zip(so.scheduled_cached_reqs.req_ids, so.scheduled_cached_reqs.num_computed_tokens):
            computed[rid] = n
        n_dec = sum(1 for n in so.num_scheduled_tokens.values() if n == 1)
        n_tok = so.total_num_scheduled_tokens
        kv_read = sum(computed[r] + n for r, n in so.num_scheduled_tokens.items())  # keys attended, per q row
        attn = sum(4 * L * qh * hd * n * (computed[r] + n / 2) for r, n in so.num_scheduled_tokens.items())
        rows = len(so.num_scheduled_tokens)  # rows that reach the lm_head (at most)
        ideal = max((2 * (body + vocab * h) + kv_tok * (kv_read + n_tok)) / bw,
                    (2 * body * n_tok + 2 * vocab * h * rows + attn) / flops)
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        steps.append((ev, n_tok, n_dec, ideal, kv_read))
        return launch(so)

    runner.execute_model_async = timed_launch
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        del runner.execute_model_async
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    torch.cuda.synchronize()
    classes: dict[str, list[float]] = {}
    for (ev, n_tok, n_dec, ideal, kv_read), nxt in zip(steps, [s[0] for s in steps[1:]] + [end]):
        kind = "decode-only" if n_tok == n_dec else "with prefill"
        c = classes.setdefault(kind, [0, 0.0, 0.0, 0, 0])
        c[0] += 1
        c[1] += ev.elapsed_time(nxt)
        c[2] += 1e3 * ideal
        c[3] += n_tok
        c[4] += n_dec
    return [f"| {k} | {n} | {t / n:.0f} | {d / n:.0f} | {ms:.0f} | {ideal:.0f} | {100 * ideal / ms:.0f}% |"
            for k, (n, ms, ideal, t, d) in classes.items()]


@contextlib.contextmanager
def _compiles() -> Iterator[list[str]]:
    """The names of the Triton/Gluon kernels compiled (cache misses) inside the block, each variant
    printed in full: a timed run should see none (the warm-up and the engine's start-up compile
    every variant a step needs). This process only: with ``--tp`` the workers compile in theirs."""
    import triton

    names: list[str] = []

    def hook(**kw) -> bool:
        names.append(kw["repr"].split("[", 1)[0])
        print(f"  compiling in a timed run: {kw['repr'][:2000]}", flush=True)  # which variant the warm-ups missed
        return False  # go on and compile

    previous, triton.knobs.runtime.jit_cache_hook = triton.knobs.runtime.jit_cache_hook, hook
    try:
        yield names
    finally:
        triton.knobs.runtime.jit_cache_hook = previous


def run(model_dir: str, async_scheduling: bool, backend: str | None, workloads: dict, bw: float,
        flops: float, tp: int = 1, profile: tuple[str, ...] = (), steps: tuple[str, ...] = (),
        kv_cache_dtype: str = "auto", repeat: int = 0, max_batched_tokens: int = 8192) -> dict:
    from engine import LLM, SamplingParams

    llm = LLM(model=model_dir, device="cuda", dtype="bfloat16", load_format="dummy", max_model_len=4096 + 2048,
              max_num_seqs=256, max_num_batched_tokens=max_batched_tokens, attention_backend=backend,
              async_scheduling=async_scheduling, tensor_parallel_size=tp, kv_cache_dtype=kv_cache_dtype)
    warm_up(llm, workloads)
    res = {"backend": llm.info.attention_backend, "bs1_tps": _bs1(llm)}
    if tp == 1:
        for batch in (1, 128):
            res[f"idle{batch}"] = idle_between_steps(llm, batch)
    for name, (n_req, plen, olen, shared) in workloads.items():
        prompts = make_prompts(name, n_req, plen, shared)
        floor = floor_seconds(LLAMA3_8B, n_req, plen, olen, shared, bw, flops, prefix_cached=shared > 0, n_gpus=tp)
        for attempt in range(1 + repeat):
            with _compiles() as compiled:
                outs, dt, n_out = timed_greedy(llm, prompts, olen)
            r = dict(total_tps=(sum(map(len, prompts)) + n_out) / dt, output_tps=n_out / dt, pct=100 * floor / dt,
                     tokens=[o.outputs[0].token_ids for o in outs[:4]])
            res.setdefault(name, r)  # the table shows the first run
            print(f"async={async_scheduling} {name}{' (again)' if attempt else ''}: {r['total_tps']:,.0f} tok/s "
                  f"total, {r['output_tps']:,.0f} out, {r['pct']:.0f}% of floor; Triton compiles in the run: "
                  f"{len(compiled)} {dict(collections.Counter(compiled)) if compiled else ''}", flush=True)
        if name in steps and tp == 1:
            llm.scheduler.reset_prefix_cache()
            res[f"steps-{name}"] = step_breakdown(
                llm, prompts, SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True), bw, flops)
        if name in profile:
            from benchmarks.profile_run import profile_generate
            profile_generate(llm, prompts, SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True),
                             f"{name}-async-{'on' if async_scheduling else 'off'}",
                             reset=llm.scheduler.reset_prefix_cache)
    llm.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention-backend", default="triton")
    ap.add_argument("--decode-len", type=int, default=512, help="decode-heavy output length")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (GPUs of this host)")
    ap.add_argument("--profile", default="", help="comma-separated workloads to profile after timing them "
                    "(device busy and idle gaps, top kernels; host functions to $OUT; see profile_run.py)")
    ap.add_argument("--modes", default="off,on", help="async_scheduling modes to run")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (bf16) or fp8 (the floors still count bf16 KV)")
    ap.add_argument("--workloads", default="decode-heavy,mixed,shared-prefix",
                    help="comma-separated workloads to time (the table shows n/a for the others)")
    ap.add_argument("--repeat", type=int, default=0, help="time each workload this many more times (the "
                    "table shows the first run; the log shows every run)")
    ap.add_argument("--max-batched-tokens", type=int, default=8192,
                    help="the engine's max_num_batched_tokens (the step's token budget)")
    ap.add_argument("--steps", default="", help="comma-separated workloads whose steps to time by class "
                    "(with prefill / decode-only) against each class's roofline (one GPU)")
    args = ap.parse_args()
    workloads = {"decode-heavy": (128, 32, args.decode_len, 0), "mixed": WORKLOADS["mixed"],
                 "shared-prefix": WORKLOADS["shared-prefix"]}
    unknown = set(args.workloads.split(",")) - set(workloads)
    if unknown:
        ap.error(f"unknown workloads {sorted(unknown)}; choose from {sorted(workloads)}")
    workloads = {k: v for k, v in workloads.items() if k in args.workloads.split(",")}
    bw, flops = measure_roofline()
    gpu = torch.cuda.get_device_name()
    roof = args.tp * bw / (params_of(LLAMA3_8B) * 2)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA3_8B, f)
        modes = [m == "on" for m in args.modes.split(",")]
        profile, steps = (tuple(filter(None, a.split(","))) for a in (args.profile, args.steps))
        res = {mode: run(d, mode, args.attention_backend, workloads, bw, flops, args.tp, profile, steps,
                         args.kv_cache_dtype, args.repeat, args.max_batched_tokens) for mode in modes}
    same = all(res[True][w]["tokens"] == res[False][w]["tokens"] for w in workloads) if len(res) == 2 else "n/a"
    print(f"\nGPU: {args.tp} x {gpu}; copy {bw / 1e12:.2f} TB/s, bf16 {flops / 1e12:.0f} TFLOP/s per GPU; "
          f"backend {next(iter(res.values()))['backend']}; KV cache {args.kv_cache_dtype}; "
          f"max_num_batched_tokens {args.max_batched_tokens}; "
          f"greedy tokens equal in both modes: {same}\n")
    print("| async_scheduling | bs=1 tok/s (% of roofline) | decode-heavy total tok/s (% floor) | "
          "mixed out tok/s (% floor) | shared-prefix total tok/s (% floor) |")
    print("|---|---|---|---|---|")

    def cell(r: dict, name: str, key: str) -> str:
        return f"{r[name][key]:,.0f} ({r[name]['pct']:.0f}%)" if name in r else "n/a"

    for mode, r in res.items():
        print(f"| {'on' if mode else 'off'} | {r['bs1_tps']:.0f} ({100 * r['bs1_tps'] / roof:.0f}%) | "
              f"{cell(r, 'decode-heavy', 'total_tps')} | {cell(r, 'mixed', 'output_tps')} | "
              f"{cell(r, 'shared-prefix', 'total_tps')} |")
    if args.tp == 1:
        print("\n| async_scheduling | decode batch | wall ms per step | device idle between steps, ms per step |")
        print("|---|---|---|---|")
        for mode in res:
            for batch in (1, 128):
                wall, idle = res[mode][f"idle{batch}"]
                print(f"| {'on' if mode else 'off'} | {batch} | {wall:.2f} | {idle:.3f} |")
    for mode, r in res.items():
        for key in (k for k in r if k.startswith("steps-")):
            print(f"\n{key[6:]}, async_scheduling {'on' if mode else 'off'}: device time per class of step\n")
            print("| steps | count | tokens per step | decode rows per step | device ms | roofline ms | % |")
            print("|---|---|---|---|---|---|---|")
            print("\n".join(r[key]))


if __name__ == "__main__":
    main()
