"""GPU attention check and speed table: the Triton backend vs the torch reference and flash-attn-4.

    python benchmarks/gpu_attention.py [--quick] [--block-size 16] [--sweep] [--no-flash]

(a) correctness: Triton forward (KV write + attention) vs the torch reference in the same
dtype and vs float64 on mixed batches (decodes + prefill chunks over cached prefixes, padded
rows, forced split / no split, the no-cache profiling path, a CUDA-graph replay with longer
contexts than at capture); float32 must be within 1e-5 (relative L2), bf16 within 1e-2.
(b) speed on the Llama-3-8B attention shape (32 q heads, 8 kv heads, head_dim 128, bf16):
decode batch x context and prefill chunks over a prefix, Triton vs flash-attn-4 on the same
paged inputs (CUDA-graph replays, median, rotating inputs), KV-read TB/s and TFLOP/s; prefill
rows also with the prefill blocks in the unified kernel (the default takes the Gluon kernel on sm90).
The markdown tables go to stdout and to $OUT/attention.md when OUT is set.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from attention.metadata import AttentionMetadata  # noqa: E402
from attention.torch_ref import TorchAttentionBackend  # noqa: E402
from attention.triton_attn import TritonAttentionBackend, unified_attention  # noqa: E402
from benchmarks.report import publish  # noqa: E402

DEV = "cuda"
HQ, HKV, D = 32, 8, 128  # Llama-3-8B attention


class Inputs:
    """q/k/v of the new tokens, a paged cache (random prefix, shuffled blocks) and metadata."""

    def __init__(self, q_lens: list[int], ctx: list[int], block_size: int, dtype: torch.dtype,
                 pad_reqs: int = 0, pad_tokens: int = 0, seed: int = 0,
                 max_blocks: int | None = None) -> None:
        g = torch.Generator(device=DEV).manual_seed(seed)
        seq = [q + c for q, c in zip(q_lens, ctx)]
        per_req = [-(-s // block_size) for s in seq]
        num_blocks = 1 + sum(per_req)
        perm = torch.randperm(num_blocks - 1, device=DEV, generator=g).int() + 1
        width = max_blocks or max(per_req)
        starts = np.concatenate([[0], np.cumsum(per_req)])
        table = torch.zeros(len(q_lens) + pad_reqs, width, dtype=torch.int32, device=DEV)
        slots = []
        for r, n in enumerate(per_req):
            table[r, :n] = perm[starts[r]:starts[r + 1]]
            pos = torch.arange(ctx[r], seq[r], device=DEV)
            slots.append(table[r, pos // block_size].long() * block_size + pos % block_size)
        slots.append(torch.full((pad_tokens,), -1, dtype=torch.int64, device=DEV))
        n_tok = sum(q_lens)
        qsl = np.concatenate([[0], np.cumsum(q_lens), [n_tok] * pad_reqs]).astype(np.int32)
        lens = np.array(seq + [0] * pad_reqs, dtype=np.int32)
        self.md = AttentionMetadata(
            torch.from_numpy(qsl).to(DEV), torch.from_numpy(lens).to(DEV), table,
            torch.cat(slots), max(q_lens), max(seq), n_tok, len(q_lens), qsl, lens)
        self.kv_cache = torch.randn(2, num_blocks, block_size, HKV, D, device=DEV, dtype=dtype,
                                    generator=g)
        total = n_tok + pad_tokens
        self.q = torch.randn(total, HQ, D, device=DEV, dtype=dtype, generator=g)
        self.k = torch.randn(total, HKV, D, device=DEV, dtype=dtype, generator=g)
        self.v = torch.randn(total, HKV, D, device=DEV, dtype=dtype, generator=g)



def flash_available(wanted: bool = True) -> bool:
    """Whether flash-attn-4's columns run: wanted and importable (else one line says why not)."""
    if not wanted:
        return False
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as e:  # noqa: BLE001 - report and go on without it
        print(f"flash-attn-4 not importable ({e}): its columns are skipped")
        return False
    return True


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def fa4_fn(q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata, scale: float):
    from flash_attn.cute import flash_attn_varlen_func
    return flash_attn_varlen_func(q, kv_cache[0], kv_cache[1], cu_seqlens_q=md.query_start_loc,
                                  max_seqlen_q=md.max_query_len, seqused_k=md.seq_lens,
                                  page_table=md.block_table, softmax_scale=scale, causal=True)


def bench(fn) -> tuple[float, str]:
    """Median ms per call over CUDA-graph replays (event timing if capture fails)."""
    import triton.testing as tt
    try:
        return tt.do_bench_cudagraph(fn, rep=50, return_mode="median"), "CUDA graph replays"
    except Exception as e:  # noqa: BLE001 - report and time without a graph
        print(f"graph timing failed ({type(e).__name__}: {e}); using events", flush=True)
        return tt.do_bench(fn, warmup=25, rep=100, return_mode="median"), "events, no graph"


def capture_graph(fn):
    """Capture ``fn`` (already warmed up) in a device graph; returns the graph."""
    if hasattr(torch.accelerator, "Graph"):
        graph, stream = torch.accelerator.Graph(), torch.Stream()
        stream.wait_stream(torch.accelerator.current_stream())
        with stream, graph:
            fn()
        torch.accelerator.current_stream().wait_stream(stream)
        return graph
    from triton.runtime import driver  # older torch: its CUDA module, through triton
    dev = driver.active.get_device_interface()
    graph = dev.CUDAGraph()
    with dev.graph(graph):
        fn()
    return graph


def _ref_backend(scale: float) -> TorchAttentionBackend:
    return TorchAttentionBackend(HQ, HKV, D, scale)


def correctness(block_size: int, quick: bool) -> list[tuple[str, str, float, float, bool]]:
    scale = D ** -0.5
    cases = {
        "mixed": ([1] * 6 + [37, 300, 5], [3000, 17, 900, 4100, 1, 64, 0, 700, 2047]),
        "decode16": ([1] * 16, [5000, 33, 700, 16, 4096, 1, 2500, 999] * 2),
        "prefill": ([1000], [0]),
        "chunk_after_prefix": ([513], [3000]),
    }
    if quick:
        cases.pop("decode16")
    rows = []
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        for name, (q_lens, ctx) in cases.items():
            for splits in (None, 1, 7):
                inp = Inputs(q_lens, ctx, block_size, dtype, pad_reqs=3, pad_tokens=5,
                             seed=len(name))
                ref_cache = inp.kv_cache.double()
                ref64 = _ref_backend(scale)(inp.q.double(), inp.k.double(), inp.v.double(),
                                            ref_cache, inp.md)
                ref = _ref_backend(scale)(inp.q, inp.k, inp.v, inp.kv_cache.clone(), inp.md)
                be = TritonAttentionBackend(HQ, HKV, D, scale)
                be.num_splits_override = splits
                cache = inp.kv_cache.clone()
                out = be(inp.q, inp.k, inp.v, cache, inp.md)
                n = inp.md.num_actual_tokens
                pad_ok = bool(torch.count_nonzero(out[n:]) == 0) and not bool(out.isnan().any())
                # slot -1 leaves the cache alone: no slot but the real tokens' changed
                nb, bs = cache.shape[1:3]
                changed = (cache != inp.kv_cache).view(2, nb * bs, -1).any(-1).any(0)
                changed[inp.md.slot_mapping[:n]] = False
                write_ok = not bool(changed.any())
                e64, e_ref = rel_err(out[:n], ref64[:n]), rel_err(out[:n], ref[:n])
                ok = e64 <= tol and pad_ok and write_ok
                label = f"{name} splits={'auto' if splits is None else splits}"
                rows.append((label, str(dtype).split(".")[-1], e_ref, e64, ok))
        inp = Inputs([700, 1, 33], [0, 0, 0], block_size, dtype, pad_reqs=1, pad_tokens=3)
        out = TritonAttentionBackend(HQ, HKV, D, scale)(inp.q, inp.k, inp.v, None, inp.md)
        ref64 = _ref_backend(scale)(inp.q.double(), inp.k.double(), inp.v.double(), None, inp.md)
        e = rel_err(out[:734], ref64[:734])
        rows.append(("no cache (profiling)", str(dtype).split(".")[-1], float("nan"), e, e <= tol))
        rows.append(graph_replay_check(block_size, dtype, tol))
    return rows


def graph_replay_check(block_size: int, dtype: torch.dtype, tol: float):
    """Capture a padded decode batch, then replay it with other lengths written into the same
    metadata buffers: the result must follow the new data (no host-side decision baked in)."""
    scale = D ** -0.5
    small = Inputs([1] * 5, [40, 3, 100, 7, 64], block_size, dtype, pad_reqs=3, pad_tokens=3,
                  max_blocks=4096 // block_size + 1, seed=1)
    big = Inputs([1] * 7, [4000, 1, 2900, 150, 3333, 17, 600], block_size, dtype, pad_reqs=1,
                pad_tokens=1, max_blocks=4096 // block_size + 1, seed=2)
    md = small.md
    be = TritonAttentionBackend(HQ, HKV, D, scale)
    q, k, v = small.q.clone(), small.k.clone(), small.v.clone()
    cache = torch.zeros_like(big.kv_cache)
    cache[:, :small.kv_cache.shape[1]] = small.kv_cache
    result = {}

    def step() -> None:
        result["out"] = be(q, k, v, cache, md)

    step()  # compile outside the capture
    graph = capture_graph(step)
    for name in ("query_start_loc", "seq_lens", "block_table", "slot_mapping"):
        getattr(md, name).copy_(getattr(big.md, name))
    q.copy_(big.q), k.copy_(big.k), v.copy_(big.v)
    cache.copy_(big.kv_cache)
    graph.replay()
    ref_md = big.md
    ref = _ref_backend(scale)(big.q.double(), big.k.double(), big.v.double(),
                              big.kv_cache.double(), ref_md)
    e = rel_err(result["out"][:7], ref[:7])
    return ("graph replay, longer contexts", str(dtype).split(".")[-1], float("nan"), e, e <= tol)


def speed(block_size: int, quick: bool, with_flash: bool):
    scale = D ** -0.5
    batches = (1, 64) if quick else (1, 16, 64, 256)
    contexts = (4096,) if quick else (512, 4096, 16384)
    rows = []
    for b in batches:
        for ctx in contexts:
            rows.append(_time_case(f"decode b={b} ctx={ctx}", [1] * b, [ctx - 1] * b, block_size,
                                   scale, with_flash))
    for q_len in ((2048,) if quick else (2048, 8192)):
        for ctx in (0, 8192):
            rows.append(_time_case(f"prefill {q_len // 1024}k over {ctx // 1024}k", [q_len], [ctx],
                                   block_size, scale, with_flash))
    return rows


def _time_case(label, q_lens, ctx, block_size, scale, with_flash):
    seq = [q + c for q, c in zip(q_lens, ctx)]
    kv_bytes = sum(seq) * HKV * D * 2 * 2
    rot = max(1, min(8, math.ceil(256e6 / kv_bytes)))
    sets = [Inputs(q_lens, ctx, block_size, torch.bfloat16, seed=i) for i in range(rot)]
    it = {"i": 0}

    def ours(kernel: str | None = None) -> None:
        s = sets[it["i"] % len(sets)]
        it["i"] += 1
        unified_attention(s.q, s.k, s.v, s.kv_cache, s.md, scale, prefill_kernel=kernel)

    def theirs() -> None:
        s = sets[it["i"] % len(sets)]
        it["i"] += 1
        fa4_fn(s.q, s.kv_cache, s.md, scale)

    t_ours, how = bench(ours)
    # the prefill blocks in the unified Triton kernel too (the default takes Gluon on sm90)
    t_unified = bench(lambda: ours("triton"))[0] if max(q_lens) > 1 else float("nan")
    t_fa = bench(theirs)[0] if with_flash else float("nan")
    flops = 4 * HQ * D * sum(q * c + q * (q + 1) / 2 for q, c in zip(q_lens, ctx))
    del sets
    torch.accelerator.empty_cache()
    return label, t_ours, t_fa, kv_bytes, flops, how, t_unified


def gather_sweep(block_size: int) -> list[str]:
    """Markdown rows: prefill rows of 64-2048 tokens over 8k cached (the query blocks reading each
    cached page: q_len / 32), Triton with the prefix read page by page vs gathered first
    (``prefix_gather`` False / True), to set ``GATHER_MIN_READS`` from."""
    from attention.prefix_gather import GATHER_MIN_READS, plan_prefix_gather
    scale = D ** -0.5
    rows = []
    for q_len in (64, 128, 256, 512, 2048):
        s = Inputs([q_len], [8192], block_size, torch.bfloat16)
        t = {g: bench(lambda g=g: unified_attention(s.q, s.k, s.v, s.kv_cache, s.md, scale,
                                                    prefix_gather=g))[0] * 1e3 for g in (False, True)}
        auto = plan_prefix_gather(s.md, block_size, 32).num_pages > 0
        rows.append(f"| {q_len} over 8k | {-(-q_len // 32)} | {t[False]:.1f} | {t[True]:.1f} | "
                    f"{t[False] / t[True]:.2f} | {'gather' if auto else 'paged'} |")
        del s
    return [f"GATHER_MIN_READS = {GATHER_MIN_READS}", "",
            "| prefill | query blocks per page | paged us | gathered us | paged / gathered | default |",
            "|---|---|---|---|---|---|"] + rows


def block_size_sweep(with_flash: bool):
    scale = D ** -0.5
    shapes = [("decode b=64 ctx=4096", [1] * 64, [4095] * 64),
              ("decode b=1 ctx=16384", [1], [16383]),
              ("prefill 2k over 8k", [2048], [8192])]
    rows = []
    for bs in (16, 32, 64, 128):
        for label, q_lens, ctx in shapes:
            r = _time_case(label, q_lens, ctx, bs, scale, with_flash)
            rows.append((bs,) + r)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes (about a minute)")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="also time block sizes 16..128")
    ap.add_argument("--no-flash", action="store_true", help="skip the flash-attn-4 column")
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--gather-sweep", action="store_true",
                    help="also time the prefix gather against paged reads (64-2048 tokens over 8k)")
    args = ap.parse_args()
    if not torch.accelerator.is_available():
        sys.exit("needs a CUDA GPU")
    with_flash = flash_available(not args.no_flash)
    torch.manual_seed(0)
    t0 = time.time()
    from attention.triton_tiles import device_sm_count
    import triton
    md_lines = [f"# Attention on {torch.accelerator.current_accelerator()} "
                f"({device_sm_count('cuda', torch.accelerator.current_device_index())} SMs, "
                f"torch {torch.__version__}, triton {triton.__version__}, "
                f"block size {args.block_size})", ""]
    failed = False
    if not args.skip_correctness:
        md_lines += ["## Correctness (relative L2 error)", "",
                     "| case | dtype | vs torch ref (same dtype) | vs float64 | ok |",
                     "|---|---|---|---|---|"]
        for label, dt, e_ref, e64, ok in correctness(args.block_size, args.quick):
            failed |= not ok
            md_lines.append(f"| {label} | {dt} | {e_ref:.2e} | {e64:.2e} | {'yes' if ok else 'NO'} |")
        print(f"correctness done in {time.time() - t0:.0f}s", flush=True)
    md_lines += ["", "## Speed, Llama-3-8B attention (32/8 heads, d=128, bf16)", "",
                 "| case | triton us | unified kernel us | flash-attn-4 us | triton/FA4 | triton KV TB/s | "
                 "triton TFLOP/s |",
                 "|---|---|---|---|---|---|---|"]
    for label, t, tf, kv_bytes, flops, how, tu in speed(args.block_size, args.quick, with_flash):
        goal = 1.1 if label.startswith("decode") else 1.2
        ratio = t / tf if with_flash else float("nan")
        mark = "" if not with_flash else (" ok" if ratio <= goal else " SLOW")
        unified = "-" if math.isnan(tu) else f"{tu * 1e3:.1f}"
        md_lines.append(f"| {label} | {t * 1e3:.1f} | {unified} | {tf * 1e3:.1f} | {ratio:.2f}{mark} | "
                        f"{kv_bytes / t / 1e9:.2f} | {flops / t / 1e9:.0f} |")
    md_lines.append(f"\nTiming: {how} (median), inputs rotated when the KV fits in L2 several times.")
    if args.sweep:
        md_lines += ["", "## Block size sweep", "",
                     "| block | case | triton us | flash-attn-4 us |", "|---|---|---|---|"]
        best: dict[str, tuple[float, int]] = {}
        for bs, label, t, tf, *_ in block_size_sweep(with_flash):
            md_lines.append(f"| {bs} | {label} | {t * 1e3:.1f} | {tf * 1e3:.1f} |")
            best[label] = min(best.get(label, (t, bs)), (t, bs))
        md_lines.append("\nBest block size for triton: " + ", ".join(
            f"{label}: {bs}" for label, (_, bs) in best.items()))
    if args.gather_sweep:
        md_lines += ["", "## Prefix gather vs paged reads (Triton, bf16)", ""] + gather_sweep(args.block_size)
    md_lines.append(f"\nTotal {time.time() - t0:.0f}s.")
    publish("\n".join(md_lines), "attention.md")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
