"""Batch-1 projections: the GEMV kernels (with the op before each fused in) vs the unfused path.

    python benchmarks/gpu_gemv.py [--search] [--e2e] [--tp N]

Llama-3-8B shapes, bf16, one row. For each projection: the unfused path (the fused elementwise
kernel, then cuBLAS through ``F.linear``; for qkv then the rotary kernel) against one GEMV kernel
with its prologue (qkv and gate_up: residual add + RMSNorm; down: SiLU-and-mul; o_proj and
lm_head: none) and, for qkv, RoPE on q and k as its epilogue, in
microseconds per call and the weight's read bandwidth. Timing: one CUDA graph of calls over
enough distinct weight copies (>= 400 MB) that the weights come from HBM, not L2.
"PDL off": with env RUNNERS_PDL=0, no programmatic dependent launch (consecutive calls do not
overlap).
``--tp N``: one rank's shard of each projection under N-way tensor parallelism (qkv, gate_up and
lm_head keep 1/N of their rows, o_proj and down 1/N of their columns; no --e2e).
``--search`` also times a grid of launch configs per projection and prints the best three
(``models.fused_ops.gemv_config`` comes from it). ``--e2e`` also times batch-1 decode of the
whole 8B-shaped model (random weights, Triton attention, graphs, async scheduling) without the
GEMV kernels (cuBLAS + the elementwise kernels), with them but no PDL, and with them, in one process.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.gpu_attention import capture_graph  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from models.fused_ops import (GemvConfig, GemvRope, fused_add_rmsnorm, gemv, gemv_config,  # noqa: E402
                              rmsnorm_gemv, rotary, silu_and_mul, silu_mul_gemv)

# name -> (N, K, prologue)
SHAPES = {"qkv": (6144, 4096, "add_rmsnorm+rope"), "o_proj": (4096, 4096, None),
          "gate_up": (28672, 4096, "add_rmsnorm"), "down": (4096, 14336, "silu_mul"),
          "lm_head": (128256, 4096, None)}
DEVICE = "cuda"


def graph_us(fn: Callable[[int], object], copies: int, reps: int = 10) -> float:
    """Microseconds per ``fn(i)`` over a graph of ``fn(0..copies-1)``, replayed ``reps`` times."""
    def all_copies() -> None:
        for i in range(copies):
            fn(i)
    all_copies()  # compile outside the capture
    g = capture_graph(all_copies)
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps / copies


def _calls(prologue: str | None, k: int, ws: list[torch.Tensor], nw: torch.Tensor, tp: int = 1):
    """(unfused fn, GEMV fn taking a config) on weight copy i; both return the projection."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).to(DEVICE)  # noqa: E731
    if prologue == "add_rmsnorm+rope":  # Llama-3-8B: 32 q, 8 kv heads of 128 (1/tp of them on a rank)
        qh, kvh = 32 // tp, 8 // tp
        x, res = rand(1, k), rand(1, k)
        pos = torch.tensor([100], device=DEVICE)
        angles = torch.arange(4096.0)[:, None] * (500000.0 ** (-torch.arange(0, 128, 2) / 128))[None, :]
        cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
        rope = GemvRope(pos, cos, sin, 128, (qh + kvh) * 128)

        def unfused_qkv(i: int) -> torch.Tensor:
            qkv = F.linear(fused_add_rmsnorm(x, nw, 1e-5, res)[0], ws[i])
            q, kv = qh * 128, (qh + kvh) * 128
            return rotary(qkv[:, :q].view(1, qh, 128), qkv[:, q:kv].view(1, kvh, 128), pos, cos, sin)
        return unfused_qkv, lambda i, c=None: rmsnorm_gemv(x, nw, 1e-5, ws[i], None, res, config=c, rope=rope)[0]
    if prologue == "add_rmsnorm":
        x, res = rand(1, k), rand(1, k)
        return (lambda i: F.linear(fused_add_rmsnorm(x, nw, 1e-5, res)[0], ws[i]),
                lambda i, c=None: rmsnorm_gemv(x, nw, 1e-5, ws[i], None, res, config=c)[0])
    if prologue == "silu_mul":
        x = rand(1, 2 * k)
        return lambda i: F.linear(silu_and_mul(x), ws[i]), lambda i, c=None: silu_mul_gemv(x, ws[i], config=c)
    x = rand(1, k)
    return lambda i: F.linear(x, ws[i]), lambda i, c=None: gemv(x, ws[i], config=c)


def search_grid() -> list[GemvConfig]:
    return [GemvConfig(*c) for c in itertools.product((4, 8, 16), (256, 512, 1024, 2048), (1,), (4, 8))]


@contextlib.contextmanager
def variant(use_gemv: bool = True, pdl: bool = True) -> Iterator[None]:
    """GEMV kernels off (cuBLAS + elementwise kernels); programmatic dependent launch off (every kernel)."""
    import models.layers
    from platforms.triton_support import PDL_ENV_VAR
    saved = models.layers._takes_gemv, os.environ.get(PDL_ENV_VAR)
    if not use_gemv:
        models.layers._takes_gemv = lambda x, w: False
    if not pdl:
        os.environ[PDL_ENV_VAR] = "0"
    try:
        yield
    finally:
        models.layers._takes_gemv = saved[0]
        if saved[1] is None:
            os.environ.pop(PDL_ENV_VAR, None)
        else:
            os.environ[PDL_ENV_VAR] = saved[1]


def decode_bs1(out_tokens: int = 256) -> float:
    """Batch-1 decode tok/s (1 / time per output token, best of 3) of the Llama-3-8B shape."""
    import json
    import tempfile

    from benchmarks.gpu_throughput import LLAMA3_8B
    from benchmarks.gpu_tp import _bs1
    from engine import LLM

    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA3_8B, f)
        llm = LLM(model=d, device="cuda", dtype="bfloat16", load_format="dummy", max_model_len=4096,
                  max_num_seqs=16, attention_backend="triton")
    tps = max(_bs1(llm, out_tokens) for _ in range(3))
    llm.shutdown()
    del llm
    torch.cuda.empty_cache()
    return tps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--search", action="store_true")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--tp", type=int, default=1, help="time one rank's shard under N-way tensor parallelism")
    args = ap.parse_args()
    shapes = {name: (n // args.tp, k, pro) if name in ("qkv", "gate_up", "lm_head") else (n, k // args.tp, pro)
              for name, (n, k, pro) in SHAPES.items()}
    gpu = torch.cuda.get_device_name()
    lines = [f"Batch-1 projections: GEMV kernel vs unfused (elementwise kernel + cuBLAS), {gpu}, bf16, "
             f"weights from HBM{f', one rank of TP={args.tp}' if args.tp > 1 else ''}", "",
             "| projection [N x K] | prologue | unfused us | GEMV, PDL off us | GEMV us | speedup | GEMV weight TB/s |",
             "|---|---|---|---|---|---|---|"]
    found = ["", "Search (best three of the grid; default = gemv_config's choice):", ""]
    for name, (n, k, prologue) in shapes.items():
        copies = max(2, int(400e6 // (n * k * 2)))
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE) * 0.02 for _ in range(copies)]
        nw = (1 + 0.1 * torch.randn(k, device=DEVICE)).to(torch.bfloat16)
        unfused, fused = _calls(prologue, k, ws, nw, args.tp)
        ref = unfused(0)
        if isinstance(ref, tuple):  # qkv: the rotated q and k
            ref = torch.cat([r.reshape(1, -1) for r in ref], -1)
        ref, got = ref.float(), fused(0)[:, :ref.shape[1]].float()
        err = (got - ref).abs().max().item() / ref.abs().max().item()
        t_u, t_f = graph_us(unfused, copies), graph_us(fused, copies)
        with variant(pdl=False):
            t_np = graph_us(fused, copies)
        lines.append(f"| {name} [{n} x {k}] | {prologue or '-'} | {t_u:.1f} | {t_np:.1f} | {t_f:.1f} | "
                     f"{t_u / t_f:.2f}x | {n * k * 2 / t_f / 1e6:.2f} |"
                     + (f" max rel err {err:.1e}" if err > 1e-2 else ""))
        print(lines[-1], flush=True)
        if args.search:
            timed = []
            for c in search_grid():
                try:
                    timed.append((graph_us(lambda i, c=c: fused(i, c), copies, reps=5), c))
                except Exception as e:  # a config past the shared memory or register limit
                    if "out of resource" not in str(e):
                        raise
            timed.sort(key=lambda tc: tc[0])
            best = ", ".join(f"{t:.1f} us {tuple(c)}" for t, c in timed[:3])
            found.append(f"- {name}: default {t_f:.1f} us {tuple(gemv_config(n, k))}; best {best}")
            print(found[-1], flush=True)
        del ws
        torch.cuda.empty_cache()
    if args.e2e and args.tp == 1:
        with variant(use_gemv=False):
            off = decode_bs1()
        with variant(pdl=False):
            no_pdl = decode_bs1()
        on = decode_bs1()
        lines += ["", f"Batch-1 decode, Llama-3-8B shape, Triton attention: without GEMV kernels {off:.1f} tok/s, "
                      f"with them {on:.1f} tok/s ({on / off:.2f}x; without programmatic dependent launch "
                      f"{no_pdl:.1f})"]
        print(lines[-1], flush=True)
    publish("\n".join(lines + (found if args.search else [])), "gemv.md" if args.tp == 1 else f"gemv_tp{args.tp}.md")


if __name__ == "__main__":
    main()
