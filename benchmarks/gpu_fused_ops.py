"""Fused elementwise ops vs the torch path: ``python benchmarks/gpu_fused_ops.py [--device cuda]``.

``fused_ops_table(...)`` times each op of one decoder layer on Llama-3-8B shapes (hidden 4096,
intermediate 14336, 32/8 heads x 128, bf16) for T tokens, through the model's own modules
(``RMSNorm``, ``SiluAndMul``, ``apply_rope``) with ``fused_ops_mode`` off and on:
add+rmsnorm, rmsnorm (first layer), silu_and_mul, rope q+k (on views of a packed qkv output,
cos/sin gathered once per step as the model does), and ``layer`` = all four of a layer.

Columns: median ms per call with ``triton.testing.do_bench`` (eager launches, L2 flushed) and,
on CUDA, with ``do_bench_cudagraph`` (launch overhead gone: the GPU-side cost); the share of
16-bit outputs bit-identical to the torch path. ``--device cpu`` (with TRITON_INTERPRET=1)
only smoke-tests the script on tiny shapes.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from models.fused_ops import fused_ops_mode, get_fused_ops_mode  # noqa: E402
from models.layers import RMSNorm, SiluAndMul  # noqa: E402
from models.rotary import RotaryEmbedding, apply_rope  # noqa: E402
from benchmarks.report import publish  # noqa: E402

LLAMA3_8B = dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128)
TINY = dict(hidden=64, inter=96, heads=4, kv_heads=2, head_dim=16)


def _ops(t: int, shape: dict[str, int], dtype: torch.dtype, device: torch.device
         ) -> dict[str, Callable[[], object]]:
    """op name -> a closure running it on fixed random inputs under the ambient fused mode."""
    hid, inter, hq, hk, d = (shape[k] for k in ("hidden", "inter", "heads", "kv_heads", "head_dim"))
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(dtype).to(device)

    norm = RMSNorm(hid, 1e-5).to(device)
    norm.weight.data = (1 + 0.1 * torch.randn(hid, generator=g)).to(dtype).to(device)
    act = SiluAndMul()
    rope = RotaryEmbedding(d, 8192, 500000.0).to(device)
    h, res, gate_up = rand(t, hid), rand(t, hid), rand(t, 2 * inter)
    qkv = rand(t, (hq + 2 * hk) * d)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    positions = torch.randint(0, 8192, (t,), generator=g).to(device)
    with fused_ops_mode("off"):
        rope_torch = rope.step_inputs(positions, h)
    with fused_ops_mode("on"):
        rope_fused = rope.step_inputs(positions, h)

    def rope_qk() -> object:
        return apply_rope(q, k, rope_fused if get_fused_ops_mode() == "on" else rope_torch)

    def layer() -> object:
        out = norm(h, res)
        rope_qk()
        norm(h, res)
        return out, act(gate_up)

    return {"add+rmsnorm": lambda: norm(h, res), "rmsnorm": lambda: norm(h), "silu_and_mul": lambda: act(gate_up),
            "rope q+k": rope_qk, "layer (all four)": layer}


def _flat(out: object) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]  # type: ignore[union-attr]


def _exact_share(a: object, b: object) -> float:
    pairs = list(zip(_flat(a), _flat(b)))
    same = sum(int((x == y).sum()) for x, y in pairs)
    return same / max(1, sum(x.numel() for x, _ in pairs))


def _time(fn: Callable[[], object], device: torch.device, graph: bool) -> float:
    """Median ms per call."""
    if device.type == "cpu":
        ts = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - start) * 1e3)
        return statistics.median(ts)
    import triton.testing as tt
    if graph:
        return float(tt.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def fused_ops_table(device: str = "cuda", tokens: tuple[int, ...] = (128, 8192), dtype: torch.dtype = torch.bfloat16,
                    shape: dict[str, int] | None = None) -> list[tuple[str, int, float, float, float | None,
                                                                       float | None, float]]:
    """``[(op, T, torch ms, fused ms, torch graph ms, fused graph ms, exact share)]``; graph
    columns are None off CUDA."""
    dev = torch.device(device)
    shape = shape or LLAMA3_8B
    rows = []
    for t in tokens:
        for name, fn in _ops(t, shape, dtype, dev).items():
            timed: dict[str, tuple[float, float | None]] = {}
            outs = {}
            for mode in ("off", "on"):
                with fused_ops_mode(mode):
                    outs[mode] = fn()  # warm-up: compiles the kernels
                    eager = _time(fn, dev, graph=False)
                    graphed = _time(fn, dev, graph=True) if dev.type == "cuda" else None
                timed[mode] = (eager, graphed)
            rows.append((name, t, timed["off"][0], timed["on"][0], timed["off"][1], timed["on"][1],
                         _exact_share(outs["on"], outs["off"])))
    return rows


def markdown(rows: list[tuple[str, int, float, float, float | None, float | None, float]]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"
    lines = ["| op | T | torch ms | fused ms | speedup | torch graph ms | fused graph ms | graph speedup | exact |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, t, te, fe, tg, fg, exact in rows:
        gs = f"{tg / fg:.2f}x" if tg is not None and fg else "-"
        lines.append(f"| {name} | {t} | {te:.4f} | {fe:.4f} | {te / fe:.2f}x | {ms(tg)} | {ms(fg)} | {gs} "
                     f"| {100 * exact:.3f}% |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 8192])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = ap.parse_args()
    tiny = a.device == "cpu"
    rows = fused_ops_table(a.device, tuple([3] if tiny else a.tokens), getattr(torch, a.dtype),
                           TINY if tiny else LLAMA3_8B)
    publish(markdown(rows), "fused_ops.md")


if __name__ == "__main__":
    main()
