"""Triton backend: one unified paged-attention kernel for mixed batches, split-KV, fused KV write.

Launch plan (all decided on the host from shapes and host ints, never from device data):

* ``md.max_query_len == 1`` (pure decode, the CUDA-graph case): one launch of the decode role,
  a program per (request, kv head[, split]).
* otherwise: the decode role for q_len == 1 rows plus the prefill role, query blocks of
  ``BLOCK_Q`` tokens x all query heads of a KV head, for q_len >= 2 rows. Both read the
  same kernel; query blocks are mapped to requests in-kernel (binary search over
  ``query_start_loc``), so no per-step device metadata is built (``prepare`` only decides
  a cascade, below).
* split-KV when the programs of a launch would not fill the GPU: ``num_splits`` depends only
  on the padded token/request counts, ``md.max_query_len`` (1 for every captured decode
  batch), the head layout and the SM count, so a captured graph and its replays agree.
  Each program derives its own KV segment from the real ``seq_len`` in-kernel (at least
  ``MIN_SPLIT_TOKENS`` keys per segment; surplus splits idle), so the result is right for
  whatever lengths a replay brings; a reduce kernel combines the partial (max, sum, out).
* cascade (``md.cascade_prefix_len``, pure decode; ``TritonAttentionBackend.prepare`` decides):
  the keys every request reads through the same pages go through ``cascade_prefix_kernel`` once
  per 128 query rows into partial slots, the decode role starts after them and merges those
  slots into each row (or, when it splits too, the reduce merges all). Both kernels read the
  prefix length from ``md.shared_prefix`` on the device and the launches depend only on shapes,
  so cascade steps replay decode graphs of their own (``InputBuilder.dummy(cascade=True)``).
* padding is inert: slot -1 is skipped by the KV write, padding tokens' output rows are
  written as zeros (by the kernel, not a host-sized slice), padded request rows do nothing.
* a prefill block reads its request's cached prefix from the pages and its new tokens from the
  step's own K/V rows (TMA descriptors on CUDA sm90+, pointers elsewhere).
* prefix gather (``attention.prefix_gather``): a long prefill chunk over a long cached prefix
  reads that prefix as contiguous rows copied once per layer, not page by page.
* on sm90 the prefill blocks go to a warp-specialised Gluon kernel (``attention.hopper_prefill``,
  the same blocks and keys) unless the step splits, reads a cached prefix page by page or uses
  custom tiles; ``prefill_kernel`` forces either kernel.
* compiles happen at start-up: the first forward with a cache launches the prefill variants
  (``TritonAttentionBackend._warm_up``), and nothing a step varies (table width, split count)
  is a specialisation key.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from attention.backend import FP8_KV, FP8_KV_MAX, AttentionBackend
from attention.metadata import AttentionMetadata, dummy_prefill
from attention.prefix_gather import NO_GATHER, PrefixGather, gather_pages, plan_prefix_gather
from attention.triton_tiles import (MAX_SPLITS, MIN_SPLIT_TOKENS, TileConfig, _pow2, _prefill_tile, _sm_count,
                                    _smem_limit, choose_num_splits, decode_config, fit_shared_memory,
                                    prefix_cascade_plan)
from platforms.triton_support import compute_capability, hopper_or_newer, interpreting

CASCADE_MIN_TOKENS = 256  # shared keys from which a cascade is taken when cascades are on
_HEAD_DIMS = (32, 64, 128, 256)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_import_error() -> str | None:
    """Why triton cannot be used here (None when it imports)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return (f"the triton package is not installed ({e}): CUDA/ROCm/XPU builds of torch bring it; "
                f"otherwise pip install triton (or the project's 'triton' extra)")
    return None


def _descriptor_ok(t: torch.Tensor) -> bool:
    """``[T, Hk, D]`` rows a descriptor of ``[T, Hk * D]`` can address: heads packed, 16-byte
    aligned base and row stride (TMA's rules)."""
    elem = t.element_size()
    return (t.stride(2) == 1 and t.stride(1) == t.shape[2] and t.data_ptr() % 16 == 0
            and (t.stride(0) * elem) % 16 == 0)


def _rows_descriptor(t: torch.Tensor, block_n: int):
    from triton.tools.tensor_descriptor import TensorDescriptor
    tokens, heads, d = t.shape
    return TensorDescriptor(t, shape=[tokens, heads * d], strides=[t.stride(0), 1], block_shape=[block_n, d])


def widen_fp8_by_ptx(q: torch.Tensor, kv_cache: torch.Tensor | None) -> bool:
    """Whether the Triton kernels (unified and cascade prefix) widen an fp8 cache's tiles with PTX
    (``triton_fp8.fp8_tile``): bf16 queries over an e4m3 cache on an NVIDIA GPU of compute
    capability 8.9 or newer, compiled."""
    return (kv_cache is not None and kv_cache.dtype == FP8_KV and q.dtype == torch.bfloat16
            and q.device.type == "cuda" and torch.version.hip is None and not interpreting()
            and (compute_capability() or 0) >= 89)


def _gluon_refusal(q: torch.Tensor, kv_cache: torch.Tensor | None, pre: TileConfig, custom_tile: bool,
                   use_desc: bool, split: bool, gather: PrefixGather) -> str | None:
    """Why this step's prefill blocks stay with the unified kernel (None: the Gluon kernel takes them)."""
    from attention.hopper_prefill import device_capability, unavailable_reason
    if custom_tile or split or not use_desc:
        return "it takes the default tile, no split-KV and new K/V rows a TMA descriptor can read"
    if gather.cached_pages and not gather.num_pages:
        return "its prefill rows read a cached prefix page by page (not gathered)"
    keys = kv_cache.dtype if gather.num_pages else q.dtype  # gathered rows are the cache's; else new rows
    return unavailable_reason(q.device.type, device_capability(q.device), q.dtype, keys, q.shape[-1], pre.block_m)


def write_kv_cache_triton(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Fused K+V store by ``slot_mapping``; slot -1 (padding) leaves the cache untouched."""
    from attention.triton_cache_kernels import kv_write_kernel
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    num_kv_heads, head_dim = k_cache.shape[-2], k_cache.shape[-1]
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    kv_write_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, H_PAD=_pow2(num_kv_heads), HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], SAT=FP8_KV_MAX if kv_cache.dtype == FP8_KV else 0.0, num_warps=4)


def unified_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      kv_cache: torch.Tensor | None, md: AttentionMetadata, scale: float,
                      num_splits: int | None = None,
                      min_split_tokens: int = MIN_SPLIT_TOKENS,
                      configs: tuple[TileConfig | None, TileConfig | None] = (None, None),
                      new_kv: str | None = None,
                      prefix_gather: PrefixGather | bool | None = None,
                      prefill_kernel: str | None = None) -> torch.Tensor:
    """Attention of q ``[T, Hq, D]`` over the paged cache (or over k/v when the cache is None).

    ``num_splits`` overrides the split heuristic (1 = no split), ``min_split_tokens`` the
    shortest KV segment of a split, ``configs`` the (decode, prefill) tiles and ``new_kv`` how
    the step's new K/V rows are read ("rows": pointers, "desc": tensor descriptors; None: descriptors
    on CUDA sm90+, where they map to TMA): for tests and benchmarks. ``prefix_gather``: the
    step's plan (the backend builds it once per step), or None/True/False for
    ``plan_prefix_gather``'s heuristic / always / never. ``prefill_kernel``: "triton" (the unified
    kernel), "gluon" (``attention.hopper_prefill``; an error where it cannot serve) or None (Gluon
    on sm90 where it can: no split, default tiles, keys from new rows or a gathered prefix).
    """
    from attention.triton_kernels import (PAGED, PAGED_FP8, cascade_prefix_kernel, split_reduce_kernel,
                                          unified_attention_kernel)
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1] if kv_cache is None else kv_cache.shape[3]
    q_per_kv = num_heads // num_kv_heads
    g_pad = _pow2(q_per_kv)
    num_reqs_pad = md.seq_lens.shape[0]
    out = torch.empty_like(q)
    if num_tokens == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    k_new, v_new = (t if t.stride(-1) == 1 else t.contiguous() for t in (k, v))
    new_strides = (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1))
    if new_kv not in (None, "rows", "desc"):
        raise ValueError(f"new_kv must be None, 'rows' or 'desc', got {new_kv!r}")
    if prefill_kernel not in (None, "triton", "gluon"):
        raise ValueError(f"prefill_kernel must be None, 'triton' or 'gluon', got {prefill_kernel!r}")
    use_desc = (new_kv == "desc" or (new_kv is None and hopper_or_newer(q.device))) \
        and _descriptor_ok(k_new) and _descriptor_ok(v_new)
    has_cache = kv_cache is not None
    if has_cache:  # [2, blocks, block_size, Hk, D]: V's cache is K's at offset stride(0)
        k_src, block_size = kv_cache[0], kv_cache.shape[2]
        kv_strides = (k_src.stride(0), k_src.stride(1), k_src.stride(2), kv_cache.stride(0))
    else:  # the cache arguments are unused
        k_src, block_size, kv_strides = k_new, 1, (0,) * 4
    decode_only = md.max_query_len <= 1
    smem, elem = _smem_limit(q.device), q.element_size()
    dec = configs[0] or fit_shared_memory(decode_config(g_pad, head_dim, q.dtype), head_dim,
                                          elem, smem)
    pre = None if decode_only else (configs[1] or _prefill_tile(q, g_pad, md.max_query_len))
    grid_dec = max(num_reqs_pad, num_tokens) if decode_only else num_reqs_pad
    grid_pre = 0 if pre is None else num_tokens // pre.block_q + num_reqs_pad + 1
    if num_splits is None:
        work = num_reqs_pad if decode_only else -(-num_tokens // pre.block_q) + num_reqs_pad
        num_splits = choose_num_splits(work * num_kv_heads, _sm_count(q.device))
    # cascade: the decode rows' shared prefix once per group of requests, into partial slots
    # [0, prefix_slots) that the decode rows (which start after the prefix) merge themselves, or,
    # when they split too, the reduce with theirs; only a pure-decode step over the cache
    casc = prefix_cascade_plan(dec, g_pad, num_reqs_pad, num_kv_heads, head_dim, elem, smem, _sm_count(q.device)) \
        if md.cascade_prefix_len and decode_only and has_cache else None
    if casc and md.shared_prefix is None:
        raise ValueError("a cascade step (md.cascade_prefix_len > 0) needs md.shared_prefix, the shared "
                         "prefix length on the device")
    prefix_slots = casc[1] if casc else 0
    num_splits = min(num_splits, MAX_SPLITS - prefix_slots)
    split = num_splits > 1
    slots = prefix_slots + (num_splits if split else 0)
    if slots:
        f32 = dict(dtype=torch.float32, device=q.device)
        part_m = torch.empty((num_tokens, num_heads, slots), **f32)
        part_l = torch.empty_like(part_m)
        part_acc = torch.empty((num_tokens, num_heads, slots, head_dim), **f32)
    else:
        part_m = part_l = part_acc = out  # unused
    gather = NO_GATHER
    if pre is not None and has_cache:
        gather = prefix_gather if isinstance(prefix_gather, PrefixGather) else \
            plan_prefix_gather(md, block_size, pre.block_q, prefix_gather)
    if gather.num_pages:  # K and V rows [pages * block_size, Hk, D]
        rows = gather_pages(kv_cache, gather)
        gk, gv, g_first = rows[0], rows[1], gather.first_page
    else:
        gk, gv, g_first = k_new, v_new, md.seq_lens  # unused
    qk_scale = scale * math.log2(math.e)
    if pre is not None and prefill_kernel != "triton":
        why = _gluon_refusal(q, kv_cache, pre, configs[1] is not None, use_desc, split, gather)
        if why is None:
            from attention.hopper_prefill import hopper_prefill
            hopper_prefill(out, q, k_new, v_new, (gk, gv, g_first) if gather.num_pages else None, md.seq_lens,
                           md.query_start_loc, qk_scale, grid_pre, q_per_kv, g_pad, pre.block_q, block_size,
                           has_cache, zero_pad=True)
            pre = None  # served
        elif prefill_kernel == "gluon":
            raise ValueError(f"prefill_kernel='gluon' cannot serve this step: {why}")
    dot_prec = "ieee" if q.dtype == torch.float32 else None  # fp32: no tf32 (1e-5 target)
    cache_kv = (PAGED_FP8 if widen_fp8_by_ptx(q, kv_cache) else PAGED).value  # how tiles leave the cache
    bt = md.block_table
    prefix = md.shared_prefix if casc else md.seq_lens  # (unused without a cascade)
    if casc:
        cfg = casc[0]
        cascade_prefix_kernel[(-(-num_reqs_pad // cfg.block_q), num_kv_heads, prefix_slots)](
            q, k_src, bt, md.query_start_loc, prefix, part_m, part_l, part_acc,
            num_reqs_pad, qk_scale, q.stride(0), q.stride(1), *kv_strides, num_heads * slots, slots,
            Q_PER_KV=q_per_kv, G_PAD=g_pad, BLOCK_R=cfg.block_q, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            KEY_TILE=dec.block_n, HEAD_DIM=head_dim, BLOCK_SIZE=block_size, CACHE_KV=cache_kv,
            DOT_PREC=dot_prec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    for cfg, grid0, is_decode in ((dec, grid_dec, True), (pre, grid_pre, False)):
        if cfg is None:
            continue
        kn, vn, new_kv_mode = k_new, v_new, 1  # ROWS
        gathered = not is_decode and gather.num_pages > 0
        g_k, g_v = gk, gv
        if use_desc and not (is_decode and has_cache):  # this launch reads the new rows: DESC
            kn, vn, new_kv_mode = _rows_descriptor(k_new, cfg.block_n), _rows_descriptor(v_new, cfg.block_n), 2
            if gathered:
                g_k, g_v = _rows_descriptor(gk, cfg.block_n), _rows_descriptor(gv, cfg.block_n)
        unified_attention_kernel[(grid0, num_kv_heads, num_splits)](
            out, q, k_src, kn, vn, bt, md.seq_lens, md.query_start_loc, prefix,
            part_m, part_l, part_acc, g_k, g_v, g_first,
            num_tokens, num_reqs_pad, num_splits, max(1, min_split_tokens // cfg.block_n), prefix_slots,
            qk_scale, q.stride(0), q.stride(1), out.stride(0), out.stride(1), *kv_strides,
            *new_strides, gk.stride(0), bt.stride(0), num_heads * slots, slots,
            Q_PER_KV=q_per_kv, G_PAD=g_pad, BLOCK_Q=cfg.block_q, BLOCK_M=cfg.block_m,
            BLOCK_N=cfg.block_n, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
            IS_DECODE=is_decode, ZERO_PAD=not split and (decode_only or not is_decode),
            SPLIT=split, HAS_CACHE=has_cache, NEW_KV=new_kv_mode, CASCADE=bool(casc), GATHERED=gathered,
            CACHE_KV=cache_kv, DOT_PREC=dot_prec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split:
        split_reduce_kernel[(num_tokens, num_heads)](
            out, part_m, part_l, part_acc, md.query_start_loc, num_reqs_pad, slots,
            out.stride(0), out.stride(1), num_heads * slots, slots,
            HEAD_DIM=head_dim, S_PAD=_pow2(MAX_SPLITS), num_warps=4)  # one variant for every count
    return out


class TritonAttentionBackend(AttentionBackend):
    """Paged attention in Triton (CUDA, XPU; CPU only under ``TRITON_INTERPRET=1``)."""

    name = "triton"
    supports_graphs = True
    #: force a split count (None = heuristic) / the shortest split segment; tests, benchmarks
    num_splits_override: int | None = None
    min_split_tokens: int = MIN_SPLIT_TOKENS
    #: how the new K/V rows are read: "rows", "desc" or None (descriptors on CUDA sm90+)
    new_kv: str | None = None
    #: the prefill blocks' kernel: "triton", "gluon" or None (Gluon on sm90 where it serves)
    prefill_kernel: str | None = None
    #: cascade attention for pure-decode steps of at least ``cascade_min_reqs`` requests that
    #: share at least ``cascade_min_tokens`` leading keys (``md.shared_prefix_len``); 0: never
    #: (``benchmarks/gpu_cascade.py`` measures both)
    cascade_min_reqs: int = 8
    cascade_min_tokens: int = CASCADE_MIN_TOKENS

    @classmethod
    def wants_shared_prefix(cls) -> bool:
        return cls.cascade_min_tokens > 0

    @classmethod
    def prepare(cls, md: AttentionMetadata) -> AttentionMetadata:
        shared = md.shared_prefix_len
        if cls.cascade_min_tokens and shared >= cls.cascade_min_tokens and md.num_reqs >= cls.cascade_min_reqs:
            return dataclasses.replace(md, cascade_prefix_len=shared)
        return md

    @classmethod
    def unsupported_reason(cls, device_type: str, dtype: torch.dtype, head_dim: int,
                           block_size: int) -> str | None:
        err = triton_import_error()
        if err:
            return err
        if device_type not in ("cuda", "xpu") and not (device_type == "cpu" and interpreting()):
            return (f"triton kernels need a cuda or xpu device, got {device_type!r} "
                    "(cpu only with TRITON_INTERPRET=1)")
        if dtype not in _DTYPES:
            return f"dtype {dtype} not supported (float16, bfloat16, float32)"
        if head_dim not in _HEAD_DIMS:
            return f"head_dim={head_dim} not supported (one of {_HEAD_DIMS})"
        if block_size < 1 or block_size & (block_size - 1) or block_size > 256:
            return f"block_size={block_size} not supported (a power of two up to 256)"
        return None

    #: query lengths of the start-up prefill launches (one request each, see ``_warm_up``); the
    #: two longest run again over a cached prefix, which they gather (``plan_prefix_gather``)
    WARM_UP_QUERY_LENS = (2, 4, 8, 16, 128, 1024)
    _warm: bool = False

    @classmethod
    def kv_cache_dtype_reason(cls, kv_dtype: torch.dtype, dtype: torch.dtype, device_type: str) -> str | None:
        if kv_dtype == dtype:
            return None
        if kv_dtype != FP8_KV:
            return f"triton keeps K/V in {dtype} or {FP8_KV}, not {kv_dtype}"
        if device_type == "cuda" and not interpreting() and (compute_capability() or 0) < 89:
            return f"{FP8_KV} K/V need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper)"
        if device_type not in ("cuda", "cpu"):
            return f"{FP8_KV} K/V are not supported on {device_type}"
        return None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        if kv_cache is not None:
            reason = self.kv_cache_dtype_reason(kv_cache.dtype, q.dtype, q.device.type)
            if reason:
                raise ValueError(f"kv_cache dtype {kv_cache.dtype} with {q.dtype} queries: {reason}")
            if not self._warm:
                self._warm_up(q, kv_cache)
        return super().forward(q, k, v, kv_cache, md)

    def _warm_up(self, q: torch.Tensor, kv_cache: torch.Tensor) -> None:
        """At the first forward with a cache (the runner's warm-up step before graph capture), run
        the prefill launches real steps need on dummy requests over the null block (outputs
        dropped, nothing written): every query-block size (2-32 tokens) with split-KV, and a long
        request without, each with its mixed-step decode launch. Each variant is a JIT compile of
        seconds that would otherwise stall the first real step needing it. Where the Gluon kernel
        took the long request (sm90), it runs once more on the unified kernel: a big step whose
        cached prefix is read page by page (a short chunk over a long prefix, beside other
        prompts) needs that variant. Not on the CPU (the interpreter compiles nothing)."""
        self._warm = True
        if q.device.type == "cpu":
            return
        lens, kernel = self.WARM_UP_QUERY_LENS, self.prefill_kernel
        runs = [(n, 0, kernel) for n in lens] + [(n, n, kernel) for n in sorted(lens)[-2:]]
        if lens and kernel is None:
            runs.append((max(lens), 0, "triton"))
        for n, ctx, kern in runs:
            kv = q.new_zeros(n, self.num_kv_heads, self.head_dim)
            self._attend(q.new_zeros(n, self.num_heads, self.head_dim), kv, kv, kv_cache,
                         dummy_prefill(n, kv_cache.shape[2], q.device, ctx), kern)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        write_kv_cache_triton(k, v, kv_cache, slot_mapping)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        return self._attend(q, k, v, kv_cache, md, self.prefill_kernel)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                md: AttentionMetadata, prefill_kernel: str | None) -> torch.Tensor:
        gather = None
        if kv_cache is not None and md.max_query_len > 1:  # one plan per step, shared by its layers
            if not isinstance(md.extra, PrefixGather):
                tile = _prefill_tile(q, _pow2(self.num_heads // self.num_kv_heads), md.max_query_len)
                md.extra = plan_prefix_gather(md, kv_cache.shape[2], tile.block_q)
            gather = md.extra
        return unified_attention(q, k, v, kv_cache, md, self.scale, self.num_splits_override,
                                 self.min_split_tokens, new_kv=self.new_kv, prefix_gather=gather,
                                 prefill_kernel=prefill_kernel)

