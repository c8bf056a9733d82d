"""Piecewise graphs vs the simple full decode graphs on one GPU (Llama-3-8B shape, random bf16).

    python benchmarks/gpu_piecewise.py [startup|workloads|all]    # default all: both tables

Startup (each in a fresh process, so nothing is cached in memory): the runner's lifecycle
phases with the default simple graphs (~35 full decode graphs), then with piecewise graphs on a
fresh torch.compile cache (first start) and again on that cache (second start). Workloads (one
process per mode): the mixed workload of gpu_throughput.py and a prefill-chunked one
(64 x 2048-token prompts in 512-token chunks), tokens/s; then steady mixed steps (64 decodes +
a 448-token prefill chunk = 512 tokens) profiled: wall vs GPU kernel time per step (the host
time not covered). Greedy tokens of the first 32 steps of 8 prompts are compared with eager.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gpu_throughput import LLAMA3_8B, WORKLOADS, make_prompts, timed_greedy, warm_up  # noqa: E402

COMMON = dict(device="cuda", dtype="bfloat16", load_format="dummy", max_model_len=4096, max_num_seqs=256)


def _model_dir() -> str:
    d = tempfile.mkdtemp(prefix="pw-8b-")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(LLAMA3_8B, f)
    return d


def startup(mode: str) -> dict:
    """The runner's lifecycle, phase by phase (this process: nothing compiled yet)."""
    from engine.config import EngineConfig
    from runners.gpu import GPURunner

    t0 = time.perf_counter()
    runner = GPURunner(EngineConfig(model=_model_dir(), max_num_batched_tokens=8192,
                                    use_piecewise_graph=mode == "piecewise", **COMMON))
    phases = {}
    for name, fn in (("load", runner.load_model), ("profile (+compile)", runner.profile_run)):
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        phases[name] = time.perf_counter() - t
    runner.initialize_kv_cache(out)
    t = time.perf_counter()
    runner.capture_model()
    phases["capture"] = time.perf_counter() - t
    return dict(phases=phases, total=time.perf_counter() - t0, graphs=runner.graphs.num_graphs,
                full=len(runner.graphs.full), plan=runner.plan.describe())


def _step_profile(llm, n_decode: int = 64, chunk: int = 448, steps: int = 10) -> tuple[float, float]:
    """Wall and GPU kernel ms per mixed step (n_decode decodes + one prefill chunk)."""
    from torch.profiler import ProfilerActivity, profile

    from engine.request import Request
    from engine.sampling_params import SamplingParams

    sched, runner = llm.scheduler, llm.runner
    params = SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True)
    for i, p in enumerate(make_prompts("dec", n_decode, 64, 0)):
        sched.add_request(Request(f"d{i}", p, params))
    while sched.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in sched.running):
        so = sched.schedule()
        sched.update_from_output(so, runner.execute_model(so))
    for i, p in enumerate(make_prompts("chunks", 8, 4000, 0)):
        sched.add_request(Request(f"c{i}", p, params))

    def step() -> None:
        so = sched.schedule()
        assert so.total_num_scheduled_tokens == n_decode + chunk, so.total_num_scheduled_tokens
        sched.update_from_output(so, runner.execute_model(so))

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - t) / steps * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
    gpu = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / steps / 1e3
    for r in list(sched.running) + list(sched.waiting):
        sched.finish_requests(r.request_id, r.status.__class__.FINISHED_ABORTED)
    runner.execute_model(sched.schedule())
    return wall, gpu


def workloads(mode: str) -> dict:
    from engine import LLM, SamplingParams

    extra = {"piecewise": dict(use_piecewise_graph=True), "eager": dict(enforce_eager=True)}.get(mode, {})
    t = time.perf_counter()
    llm = LLM(model=_model_dir(), max_num_batched_tokens=512, **COMMON, **extra)
    res = {"startup": time.perf_counter() - t, "graphs": llm.info.num_graphs}
    greedy = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    res["tokens"] = [o.outputs[0].token_ids for o in llm.generate(make_prompts("eq", 8, 100, 0), greedy,
                                                                   use_tqdm=False)]
    if mode == "eager":
        return res
    n_req, plen, olen, _ = WORKLOADS["mixed"]
    timed = {"mixed": (n_req, plen, olen), "prefill-chunked": (64, 2048, 16)}
    warm_up(llm, {name: (n, p, o, 0) for name, (n, p, o) in timed.items()})
    for name, (n, p, o) in timed.items():
        prompts = make_prompts(name, n, p, 0)
        outs, dt, n_out = timed_greedy(llm, prompts, o)
        res[name] = dict(total_tps=(n * p + n_out) / dt, output_tps=n_out / dt, seconds=dt)
    llm.scheduler.reset_prefix_cache()
    res["step_wall_ms"], res["step_gpu_ms"] = _step_profile(llm)
    llm.shutdown()
    return res


def _child(kind: str, mode: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, __file__, kind, mode], capture_output=True, text=True,
                         env={**os.environ, **(env or {})})
    if out.returncode:
        print(out.stdout[-3000:], out.stderr[-6000:], sep="\n", flush=True)
        raise SystemExit(f"{kind} {mode} failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(part: str) -> None:
    gpu = torch.cuda.get_device_name()
    cache = os.environ.get("PIECEWISE_CACHE_DIR") or tempfile.mkdtemp(prefix="inductor-")
    env = {"TORCHINDUCTOR_CACHE_DIR": cache}
    if part in ("startup", "all"):
        startup_table(gpu, env)
    if part in ("workloads", "all"):
        workloads_table(gpu, env)


def startup_table(gpu: str, env: dict) -> None:
    rows = [("simple graphs (default)", _child("startup", "simple")),
            ("piecewise, first start", _child("startup", "piecewise", env)),
            ("piecewise, second start", _child("startup", "piecewise", env))]
    print(f"\n### Startup, Llama-3-8B shape (random bf16), {gpu}\n")
    print("| graphs | load s | profile (+compile) s | capture s | graphs captured | total s |\n|---|---|---|---|---|---|")
    for name, r in rows:
        p = r["phases"]
        print(f"| {name} | {p['load']:.1f} | {p['profile (+compile)']:.1f} | {p['capture']:.1f} | "
              f"{r['graphs']} ({r['full']} full) | {r['total']:.1f} |")
    print(f"\nplans: {rows[0][1]['plan']} / {rows[1][1]['plan']}", flush=True)


def workloads_table(gpu: str, env: dict) -> None:
    res = {m: _child("workloads", m, env) for m in ("simple", "piecewise", "eager")}
    print(f"\n### Workloads (max_num_batched_tokens 512, async scheduling, Triton attention), {gpu}\n")
    print("| graphs | mixed out tok/s | prefill-chunked total tok/s | mixed step (64 dec + 448 chunk): wall ms "
          "| GPU ms | host not covered ms |\n|---|---|---|---|---|---|")
    for m in ("simple", "piecewise"):
        r = res[m]
        print(f"| {m} | {r['mixed']['output_tps']:,.0f} | {r['prefill-chunked']['total_tps']:,.0f} | "
              f"{r['step_wall_ms']:.2f} | {r['step_gpu_ms']:.2f} | {r['step_wall_ms'] - r['step_gpu_ms']:.2f} |")
    for m in ("simple", "piecewise"):
        same = sum(a == b for a, b in zip(res[m]["tokens"], res["eager"]["tokens"]))
        print(f"greedy 32 tokens x 8 prompts, {m} vs eager: {same}/8 identical")


if __name__ == "__main__":
    if len(sys.argv) == 3:
        fn = {"startup": startup, "workloads": workloads}[sys.argv[1]]
        print(json.dumps(fn(sys.argv[2])))
    else:
        main(sys.argv[1] if len(sys.argv) > 1 else "all")
