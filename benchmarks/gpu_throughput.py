"""Offline throughput on a GPU: our engine vs HF transformers' continuous batching, with roofline.

    python benchmarks/gpu_throughput.py [--engine ours|hf|both] [--decode-len N] [--tp N]

A Llama-3-8B-shaped model with random bf16 weights is made on the GPU (``load_format="dummy"``;
only a config.json is written). Prompts are random token ids; greedy; EOS ignored. Prints a
markdown table (and writes $OUT/throughput.md, $OUT/throughput.json and a PNG plot when OUT is
set). The peer (HF ``generate_batch``) runs in the same process after ours is freed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time

import numpy as np
import torch

LLAMA3_8B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
                 intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                 tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=128000, eos_token_id=128001,
                 hidden_act="silu")
# name -> (requests, prompt tokens, output tokens, shared prefix tokens)
WORKLOADS = {
    "prefill-heavy": (32, 4096, 32, 0),
    "decode-heavy": (128, 32, 2048, 0),
    "mixed": (256, 512, 128, 0),
    "shared-prefix": (256, 64, 64, 1024),
}


def measure_roofline() -> tuple[float, float]:
    """(copy bandwidth bytes/s counting read + write, bf16 matmul FLOP/s), measured now."""
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")

    def timed(fn, n: int) -> float:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / n

    bw = 2 * x.numel() / timed(lambda: y.copy_(x), 20)
    flops = 2 * 8192**3 / timed(lambda: a @ b, 20)
    del x, y, a, b
    torch.cuda.empty_cache()
    return bw, flops


def make_prompts(name: str, n_req: int, prompt_len: int, shared: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed + hash(name) % 1000)
    prefix = rng.integers(1000, 120000, shared).tolist()
    return [prefix + rng.integers(1000, 120000, prompt_len).tolist() for _ in range(n_req)]


def warm_up(llm, workloads: dict) -> None:
    """Run a small copy of each workload (8 requests, 8 output tokens, other token ids) untimed: it
    compiles the kernel variants the workload's steps need (prefill tiles, split-KV, mixed decode
    rows), so no JIT compile lands inside a timed run (or only in the first of two engines of one
    process, which would favour the second). Each workload has (n_req, prompt_len, out_len, shared)."""
    from engine import SamplingParams

    for name, (n_req, plen, olen, shared) in workloads.items():
        llm.generate(make_prompts(name, min(n_req, 8), plen, shared, seed=1),
                     SamplingParams(temperature=0.0, max_tokens=min(olen, 8), ignore_eos=True), use_tqdm=False)
    llm.scheduler.reset_prefix_cache()


def timed_greedy(llm, prompts: list, out_len: int) -> tuple[list, float, int]:
    """One timed greedy ``generate`` of ``prompts`` (``out_len`` tokens each, EOS ignored) after
    clearing the prefix cache, so repeated runs start alike: (outputs, seconds, output tokens)."""
    from engine import SamplingParams

    llm.scheduler.reset_prefix_cache()
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True), use_tqdm=False)
    dt = time.perf_counter() - t
    return outs, dt, sum(len(o.outputs[0].token_ids) for o in outs)


def floor_seconds(cfg: dict, n_req: int, prompt: int, out: int, shared: int, bw: float, flops: float,
                  prefix_cached: bool, n_gpus: int = 1) -> float:
    """Lower bound: every decode step reads all weights once (out steps at least) plus the KV it
    attends over; compute is 2 x params x tokens plus attention. The larger of the two times,
    with ``n_gpus`` GPUs' bandwidth and compute (tensor parallelism splits both evenly)."""
    bw, flops = bw * n_gpus, flops * n_gpus
    h, L, kvh, hd = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    inter, vocab, qh = cfg["intermediate_size"], cfg["vocab_size"], cfg["num_attention_heads"]
    params = L * (h * (qh + 2 * kvh) * hd + qh * hd * h + 3 * h * inter) + 2 * vocab * h
    kv_tok = 2 * L * kvh * hd * 2  # bytes of K+V per token, bf16
    p_total = prompt + shared
    computed_prompt = n_req * prompt + (shared if prefix_cached else n_req * shared)
    ctx = np.arange(p_total, p_total + out)  # context read by each decode step of one request
    bytes_moved = out * params * 2 + n_req * kv_tok * float(ctx.sum()) + kv_tok * (computed_prompt + n_req * out)
    tokens = computed_prompt + n_req * out
    attn = 4 * L * qh * hd * (n_req * float(ctx.sum()) + n_req * prompt * (prompt / 2 + shared))
    return max(bytes_moved / bw, (2 * params * tokens + attn) / flops)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def run_ours(model_dir: str, workloads: dict, args) -> dict:
    from engine import LLM

    t = time.perf_counter()
    llm = LLM(model=model_dir, device="cuda", dtype="bfloat16", load_format="dummy", max_model_len=4096 + 2048,
              max_num_seqs=256, max_num_batched_tokens=args.max_batched_tokens,
              attention_backend=args.attention_backend, tensor_parallel_size=args.tp)
    startup = time.perf_counter() - t
    info = llm.info
    print(f"ours: startup {startup:.1f} s, backend {info.attention_backend}, tp {info.tensor_parallel_size}, "
          f"KV blocks {llm.num_kv_blocks}, graphs {info.num_graphs}, memory: {info.memory}", flush=True)
    warm_up(llm, workloads)
    results = {"_startup_s": startup, "_backend": info.attention_backend, "_kv_blocks": llm.num_kv_blocks}
    for name, (n_req, plen, olen, shared) in workloads.items():
        prompts = make_prompts(name, n_req, plen, shared)
        outs, dt, n_out = timed_greedy(llm, prompts, olen)
        ttft = [o.metrics.ttft for o in outs]
        tpot = [o.metrics.tpot for o in outs if o.metrics.tpot is not None]
        results[name] = dict(seconds=dt, total_tps=(sum(map(len, prompts)) + n_out) / dt, output_tps=n_out / dt,
                             ttft_med=pct(ttft, 50), ttft_p99=pct(ttft, 99), tpot_med=pct(tpot, 50),
                             tpot_p99=pct(tpot, 99), cached=sum(o.num_cached_tokens for o in outs),
                             steps=llm.stats.steps)
        print(f"ours {name}: {dt:.2f} s, {results[name]['total_tps']:,.0f} tok/s total, "
              f"{results[name]['output_tps']:,.0f} out tok/s, {llm.stats.steps} steps", flush=True)
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return results


def run_hf(workloads: dict, args) -> dict:
    import transformers as tf

    cfg = tf.LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k not in ("architectures", "torch_dtype")})
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the random model directly in bf16 on the GPU
    try:
        with torch.device("cuda"):
            model = tf.LlamaForCausalLM._from_config(cfg, attn_implementation=args.hf_attn).to(torch.bfloat16).eval()
    finally:
        torch.set_default_dtype(old)
    results = {}
    for name, (n_req, plen, olen, shared) in workloads.items():
        olen_hf = min(olen, args.hf_max_out)
        prompts = make_prompts(name, n_req, plen, shared)
        gen = tf.GenerationConfig(max_new_tokens=olen_hf, do_sample=False, eos_token_id=None, pad_token_id=0)
        try:
            torch.cuda.synchronize()
            t = time.perf_counter()
            outs = model.generate_batch(inputs=prompts, generation_config=gen)
            dt = time.perf_counter() - t
            n_out = sum(len(o.generated_tokens) for o in outs.values())
            results[name] = dict(seconds=dt, total_tps=(sum(map(len, prompts)) + n_out) / dt, output_tps=n_out / dt,
                                 output_len=olen_hf)
            print(f"hf {name}: {dt:.2f} s, {results[name]['total_tps']:,.0f} tok/s total (out {olen_hf})", flush=True)
        except Exception as e:  # noqa: BLE001 - report the peer's failure in the table, keep going
            results[name] = dict(error=f"{type(e).__name__}: {str(e)[:120]}")
            print(f"hf {name}: failed {results[name]['error']}", flush=True)
    return results


def table(ours: dict, hf: dict, bw: float, flops: float, workloads: dict, gpu: str, n_gpus: int = 1) -> str:
    lines = [f"GPU: {gpu}; measured copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s; "
             f"our backend: {ours.get('_backend', '-')}", "",
             "| workload | ours tok/s (total / out) | TTFT med / p99 ms | TPOT med / p99 ms | HF CB tok/s (total / out) "
             "| ours / HF (out) | floor s | ours s | % of roofline |", "|" + "---|" * 9]
    for name, (n_req, plen, olen, shared) in workloads.items():
        o, p = ours.get(name), hf.get(name, {})
        floor = floor_seconds(LLAMA3_8B, n_req, plen, olen, shared, bw, flops, prefix_cached=shared > 0,
                              n_gpus=n_gpus)
        if o is None:
            continue
        peer = (f"{p['total_tps']:,.0f} / {p['output_tps']:,.0f}" + (f" (out {p['output_len']})"
                if p.get("output_len", olen) != olen else "")) if "total_tps" in p else p.get("error", "-")
        ratio = f"{o['output_tps'] / p['output_tps']:.1f}x" if "output_tps" in p else "-"
        lines.append(f"| {name} ({n_req} x {shared}+{plen} -> {olen}) | {o['total_tps']:,.0f} / {o['output_tps']:,.0f} "
                     f"| {o['ttft_med'] * 1e3:,.0f} / {o['ttft_p99'] * 1e3:,.0f} | {o['tpot_med'] * 1e3:.1f} / "
                     f"{o['tpot_p99'] * 1e3:.1f} | {peer} | {ratio} | {floor:.2f} | {o['seconds']:.2f} | "
                     f"{100 * floor / o['seconds']:.0f}% |")
    return "\n".join(lines)


def plot(ours: dict, hf: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in WORKLOADS if n in ours]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(x - 0.2, [ours[n]["output_tps"] for n in names], 0.4, label="ours")
    ax.bar(x + 0.2, [hf.get(n, {}).get("output_tps", 0) for n in names], 0.4, label="HF continuous batching")
    ax.set_xticks(x, names)
    ax.set_ylabel("output tokens/s")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--engine", choices=["ours", "hf", "both"], default="both")
    ap.add_argument("--decode-len", type=int, default=2048, help="decode-heavy output length (shorter variant)")
    ap.add_argument("--hf-max-out", type=int, default=2048, help="cap the peer's output length (time)")
    ap.add_argument("--hf-attn", default="sdpa")
    ap.add_argument("--max-batched-tokens", type=int, default=8192)
    ap.add_argument("--attention-backend", default=None)
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel_size of our engine (the peer runs on one GPU)")
    ap.add_argument("--only", default=None, help="comma-separated workload names")
    ap.add_argument("--merge", default=None, help="a throughput.json from an earlier run to merge")
    args = ap.parse_args()
    workloads = dict(WORKLOADS)
    workloads["decode-heavy"] = (128, 32, args.decode_len, 0)
    if args.only:
        workloads = {k: v for k, v in workloads.items() if k in args.only.split(",")}
    bw, flops = measure_roofline()
    gpu = torch.cuda.get_device_name()
    prior = json.load(open(args.merge)) if args.merge else {}
    ours, hf = prior.get("ours", {}), prior.get("hf", {})
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA3_8B, f)
        if args.engine in ("ours", "both"):
            ours = run_ours(d, workloads, args)
    if args.engine in ("hf", "both"):
        hf = run_hf(workloads, args)
    md = table(ours, hf, bw, flops, {**WORKLOADS, **workloads}, gpu, args.tp)
    print(md)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "throughput.md"), "w") as f:
            f.write(md + "\n")
        with open(os.path.join(out, "throughput.json"), "w") as f:
            json.dump({"ours": ours, "hf": hf, "bw": bw, "flops": flops, "gpu": gpu}, f, indent=1)
        plot(ours, hf, os.path.join(out, "throughput.png"))


if __name__ == "__main__":
    main()
