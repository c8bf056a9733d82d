"""Tensor parallelism on several GPUs of one host: all-reduce latency, TP=1 vs TP=2 on the
Llama-3-8B shape, and a Llama-3-70B shape that needs two H200s.

    python benchmarks/gpu_tp.py allreduce   # NCCL vs symmetric memory, eager and in CUDA graphs
    python benchmarks/gpu_tp.py 8b          # greedy TP=2 == TP=1, bs=1 decode at TP=1/2, mixed at TP=2
    python benchmarks/gpu_tp.py 70b         # startup, KV blocks, bs=1 vs roofline, mixed at TP=2
    python benchmarks/gpu_tp.py profile     # where a bs=1 decode step's time goes at TP=2 (rank 0's
                                            # kernels, one-shot vs NCCL all-reduces)

Random bf16 weights (``load_format="dummy"``: the same model at every TP size). Prints markdown
tables; with OUT set also writes $OUT/tp_<part>.json. Keep NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 in the environment on shared hosts.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gpu_throughput import (LLAMA3_8B, WORKLOADS, floor_seconds, make_prompts,  # noqa: E402
                                       measure_roofline, warm_up)

LLAMA3_70B = {**LLAMA3_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
              "num_attention_heads": 64, "num_key_value_heads": 8}


def params_of(cfg: dict) -> int:
    h, L, kvh, hd = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    qh, inter, vocab = cfg["num_attention_heads"], cfg["intermediate_size"], cfg["vocab_size"]
    return L * (h * (qh + 2 * kvh) * hd + qh * hd * h + 3 * h * inter) + 2 * vocab * h


# --- all-reduce latency ------------------------------------------------------------------------
class _TwoShot:
    """The peer: PyTorch's own symmetric-memory all-reduce (``two_shot_all_reduce_``: reduce-scatter
    + all-gather through peer loads, a barrier at each end) on a copy of the tensor."""

    def __init__(self, device: torch.device, max_bytes: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group = torch.distributed.group.WORLD.group_name
        self.buffer = symm_mem.empty(max_bytes // 2, dtype=torch.bfloat16, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, self.group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        buf = self.buffer[:x.numel()]
        buf.copy_(x.view(-1))
        out_op = getattr(torch.ops.symm_mem, "two_shot_all_reduce_out", None)  # saves the copy back
        if out_op is not None:
            out_op(buf, "sum", self.group, x.view(-1))
            return x
        torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", self.group)
        return x.copy_(buf.view(x.shape))


def _allreduce_rank(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from platforms.symm_mem import OneShotAllReduce

    torch.cuda.set_device(rank)
    torch.manual_seed(0)  # every rank draws the same x, so the sum is world * x
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=world,
                            device_id=torch.device(f"cuda:{rank}"))
    sizes = [8 << 10, 32 << 10, 128 << 10, 512 << 10, 1 << 20, 2 << 20, 8 << 20, 32 << 20]
    dev = torch.device(f"cuda:{rank}")
    two_shot = _TwoShot(dev, max(sizes))
    one_shot = OneShotAllReduce.from_group(None, dev, torch.bfloat16, max(sizes))
    rows = []
    for nbytes in sizes:
        x = torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16)
        ref = x.float() * world
        row = {"bytes": nbytes}
        for name, fn in (("nccl", lambda t: dist.all_reduce(t) or t), ("twoshot", two_shot), ("oneshot", one_shot)):
            y = fn(x.clone())
            err = ((y.float() - ref).norm() / ref.norm()).item()
            for mode in ("eager", "graph"):
                n = 50
                bufs = [x.clone() for _ in range(n)]
                if mode == "graph":
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        for b in bufs:
                            fn(b)
                    run = g.replay
                else:
                    def run() -> None:
                        for b in bufs:
                            fn(b)
                run()
                torch.cuda.synchronize()
                dist.barrier()
                times = []
                for _ in range(5):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    run()
                    e.record()
                    torch.cuda.synchronize()
                    times.append(s.elapsed_time(e) * 1e3 / n)
                row[f"{name}_{mode}_us"] = float(np.median(times))
            row[f"{name}_relerr"] = err
        rows.append(row)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def part_allreduce() -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "ar.json")
        mp.start_processes(_allreduce_rank, args=(2, f"file://{d}/store", out), nprocs=2, start_method="spawn")
        rows = json.load(open(out))
    names = ("nccl", "twoshot", "oneshot")
    print("\nus per bf16 all-reduce, eager / in a CUDA graph of 50 back-to-back calls (rel err vs fp32 sum)\n")
    print("| message | NCCL | symm-mem two-shot (torch) | one-shot push (ours) |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['bytes'] >> 10} KiB | " + " | ".join(
            f"{r[f'{n}_eager_us']:.1f} / {r[f'{n}_graph_us']:.1f} ({r[f'{n}_relerr']:.0e})" for n in names) + " |")
    return {"allreduce": rows}


# --- engine runs ---------------------------------------------------------------------------------
def _llm(model_dir: str, tp: int, backend: str | None, max_model_len: int = 4096, dtype: str = "bfloat16"):
    from engine import LLM

    t = time.perf_counter()
    llm = LLM(model=model_dir, device="cuda", dtype=dtype, load_format="dummy", max_model_len=max_model_len,
              max_num_seqs=256, max_num_batched_tokens=8192, attention_backend=backend, tensor_parallel_size=tp)
    startup = time.perf_counter() - t
    i = llm.info
    print(f"tp={tp}: startup {startup:.1f} s, backend {i.attention_backend}, KV blocks {i.num_kv_blocks} x "
          f"{llm.config.block_size}, graphs {i.num_graphs}, memory (rank 0): {i.memory}", flush=True)
    return llm, startup


def _free(llm) -> None:
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()


def _bs1(llm, out_tokens: int = 256) -> float:
    """Decode tokens/s of one request (32-token prompt), from its time per output token."""
    from engine import SamplingParams

    p = SamplingParams(temperature=0.0, max_tokens=out_tokens, ignore_eos=True)
    llm.generate([make_prompts("bs1-warm", 1, 32, 0)[0]], SamplingParams(max_tokens=16, ignore_eos=True), use_tqdm=False)
    outs = llm.generate([make_prompts("bs1", 1, 32, 0)[0]], p, use_tqdm=False)
    return 1.0 / outs[0].metrics.tpot


def _mixed(llm, cfg: dict, bw: float, flops: float, tp: int) -> dict:
    from engine import SamplingParams

    n_req, plen, olen, shared = WORKLOADS["mixed"]
    warm_up(llm, {"mixed": WORKLOADS["mixed"]})
    prompts = make_prompts("mixed", n_req, plen, shared)
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=olen, ignore_eos=True), use_tqdm=False)
    dt = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    floor = floor_seconds(cfg, n_req, plen, olen, shared, bw, flops, prefix_cached=False, n_gpus=tp)
    return dict(seconds=dt, total_tps=(n_req * plen + n_out) / dt, output_tps=n_out / dt, floor_s=floor,
                pct_floor=100 * floor / dt)


def _greedy(llm) -> tuple[list[list[int]], list[dict[int, float]]]:
    """32 greedy tokens of 8 prompts, and the top-20 logprobs of each prompt's first token."""
    from engine import SamplingParams

    prompts = make_prompts("greedy", 8, 48, 0)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, logprobs=20),
                        use_tqdm=False)
    first = [dict(zip(o.outputs[0].logprobs[0].token_ids, o.outputs[0].logprobs[0].logprobs)) for o in outs]
    return [o.outputs[0].token_ids for o in outs], first


def _lp_error(got: list[dict[int, float]], ref: list[dict[int, float]]) -> float:
    """Largest |logprob difference| over the token ids both top-20 lists hold."""
    return max(abs(g[t] - r[t]) for g, r in zip(got, ref) for t in set(g) & set(r))


def part_engine(which: str, backend: str | None) -> dict:
    bw, flops = measure_roofline()
    cfg = LLAMA3_8B if which == "8b" else LLAMA3_70B
    gpu = torch.cuda.get_device_name()
    bytes_per_token = params_of(cfg) * 2
    res: dict = {"gpu": gpu, "bw": bw, "flops": flops, "model": which}
    one_shot = os.environ.setdefault("RUNNERS_SYMM_MEM_MAX_BYTES", str(8 << 20))  # the workers inherit it
    print(f"{gpu} x{torch.cuda.device_count()}: copy {bw / 1e12:.2f} TB/s, bf16 {flops / 1e12:.0f} TFLOP/s; "
          f"{which}: {params_of(cfg) / 1e9:.1f}B params", flush=True)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
        if which == "8b":  # a float32 reference for the bf16 runs' logprobs
            llm, _ = _llm(d, 1, backend, dtype="float32")
            res["fp32"] = dict(zip(("greedy", "first_lp"), _greedy(llm)))
            _free(llm)
        tps = [1, 2] if which == "8b" else [2]
        for tp in tps:
            llm, startup = _llm(d, tp, backend)
            r = res[f"tp{tp}"] = {"startup_s": startup, "kv_blocks": llm.num_kv_blocks,
                                  "backend": llm.info.attention_backend, "memory": llm.info.memory,
                                  "all_reduce": llm.info.all_reduce}
            if which == "8b":
                r["greedy"], r["first_lp"] = _greedy(llm)
                r["lp_err_vs_fp32"] = _lp_error(r["first_lp"], res["fp32"]["first_lp"])
            r["bs1_tps"] = _bs1(llm)
            r["bs1_roofline_tps"] = bw * tp / bytes_per_token
            print(f"tp={tp}: bs=1 decode {r['bs1_tps']:.0f} tok/s (roofline {r['bs1_roofline_tps']:.0f})", flush=True)
            if tp > 1 or which == "8b":
                r["mixed"] = _mixed(llm, cfg, bw, flops, tp)
                print(f"tp={tp}: mixed {r['mixed']}", flush=True)
            _free(llm)
        if which == "8b":  # TP=2 again with NCCL for every all-reduce (the one-shot kernel off)
            os.environ["RUNNERS_SYMM_MEM_MAX_BYTES"] = "0"
            llm, _ = _llm(d, 2, backend)
            res["tp2_nccl_bs1_tps"] = _bs1(llm)
            _free(llm)
            os.environ["RUNNERS_SYMM_MEM_MAX_BYTES"] = one_shot
    lines = ["", f"GPU: {gpu}; copy {bw / 1e12:.2f} TB/s, bf16 {flops / 1e12:.0f} TFLOP/s per GPU; model {which}",
             "", "| TP | startup s | KV blocks/rank | bs=1 tok/s | bs=1 roofline | % | mixed out tok/s | mixed % of floor |",
             "|---|---|---|---|---|---|---|---|"]
    for tp in (1, 2):
        r = res.get(f"tp{tp}")
        if r is None:
            continue
        m = r.get("mixed")
        lines.append(f"| {tp} | {r['startup_s']:.1f} | {r['kv_blocks']:,} | {r['bs1_tps']:.1f} | {r['bs1_roofline_tps']:.1f} "
                     f"| {100 * r['bs1_tps'] / r['bs1_roofline_tps']:.0f}% | "
                     + (f"{m['output_tps']:,.0f} | {m['pct_floor']:.0f}% |" if m else "- | - |"))
    if which == "8b":
        same = res["tp1"]["greedy"] == res["tp2"]["greedy"]
        first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None)
                      for x, y in zip(res["tp1"]["greedy"], res["tp2"]["greedy"])]
        same32 = sum(a == b for a, b in zip(res["tp1"]["greedy"], res["fp32"]["greedy"]))
        lines.append(f"\ngreedy TP=2 == TP=1 (bf16) on 8 prompts x 32 tokens: {same} (first differing index per "
                     f"prompt: {first_diff}); TP=1 bf16 == fp32 on {same32}/8 prompts")
        lines.append(f"max |logprob - fp32 reference| over the first token's top-20: TP=1 bf16 "
                     f"{res['tp1']['lp_err_vs_fp32']:.4f}, TP=2 bf16 {res['tp2']['lp_err_vs_fp32']:.4f}")
        lines.append(f"bs=1 speed-up TP=2/TP=1: {res['tp2']['bs1_tps'] / res['tp1']['bs1_tps']:.2f}x "
                     f"(all-reduce: {res['tp2']['all_reduce']}); TP=2 with NCCL for every all-reduce: "
                     f"{res['tp2_nccl_bs1_tps']:.0f} tok/s ({res['tp2_nccl_bs1_tps'] / res['tp1']['bs1_tps']:.2f}x)")
    print("\n".join(lines))
    return res


# --- profile -----------------------------------------------------------------------------------
def _profile_rank(rank: int, world: int, port: int, model_dir: str, all_reduce_bytes: str) -> None:
    """One torchrun-style rank (external launcher): every rank runs the engine in-process, so
    rank 0's torch.profiler sees its kernels."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), RUNNERS_SYMM_MEM_MAX_BYTES=all_reduce_bytes)
    from benchmarks.profile_run import profile_generate
    from engine import LLM, SamplingParams

    llm = LLM(model=model_dir, device="cuda", dtype="bfloat16", load_format="dummy", max_model_len=4096,
              max_num_seqs=16, attention_backend="triton", tensor_parallel_size=world,
              distributed_executor_backend="external_launcher")
    out = 128
    tps = _bs1(llm, out)
    if rank == 0:
        print(f"\n### TP={world}, all-reduce: {llm.info.all_reduce}; bs=1 decode {tps:.0f} tok/s "
              f"({1e3 / tps:.2f} ms per token); kernel totals below are over {out} tokens", flush=True)
    prompt = make_prompts("bs1", 1, 32, 0)[0]
    params = SamplingParams(temperature=0.0, max_tokens=out, ignore_eos=True)
    if rank == 0:
        profile_generate(llm, [prompt], params, f"tp{world}-bs1-{'nccl' if all_reduce_bytes == '0' else 'one-shot'}")
    else:  # the same steps as rank 0 (its collectives need them), unprofiled
        llm.generate([prompt], params, use_tqdm=False)
        llm.generate([prompt], params, use_tqdm=False)
    llm.shutdown()


def part_profile() -> dict:
    import socket

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA3_8B, f)
        for all_reduce_bytes in (str(8 << 20), "0"):
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            mp.start_processes(_profile_rank, args=(2, port, d, all_reduce_bytes), nprocs=2, start_method="spawn")
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["allreduce", "8b", "70b", "profile"])
    ap.add_argument("--attention-backend", default="triton")
    args = ap.parse_args()
    for var in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS"):
        os.environ.setdefault(var, "0" if var == "NCCL_NVLS_ENABLE" else "1")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if args.part == "profile":
        part_profile()
        return
    res = part_allreduce() if args.part == "allreduce" else part_engine(args.part, args.attention_backend)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], f"tp_{args.part}.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
