"""Triton kernels that copy KV-cache rows: the step's new K/V written to their slots
(``kv_write_kernel``, launched by ``attention.triton_attn``) and a cached prefix's pages gathered
into contiguous rows (``gather_pages_kernel``, launched by ``attention.prefix_gather``)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_pages"])
def gather_pages_kernel(src_ptr, dst_ptr, page_ids_ptr, page_rows_ptr, num_pages, src_kv_stride,
                        PAGE_ELEMS: tl.constexpr, ROW_ELEMS: tl.constexpr, BLOCK: tl.constexpr):
    """Grid ``(pages, 2, cdiv(PAGE_ELEMS, BLOCK))``: copy K (axis 1 = 0) or V (1) of page
    ``page_ids[p]`` of the cache ``[2, blocks, PAGE_ELEMS]`` (V at ``src_kv_stride``) to row ``p`` of
    ``dst`` ``[2, num_pages, PAGE_ELEMS]``; slots from ``page_rows[p]`` on (``ROW_ELEMS`` each)
    are written as zeros, not read."""
    p = tl.program_id(0)
    kv = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < PAGE_ELEMS
    page = tl.load(page_ids_ptr + p).to(tl.int64)
    live = offs < tl.load(page_rows_ptr + p) * ROW_ELEMS
    x = tl.load(src_ptr + kv.to(tl.int64) * src_kv_stride + page * PAGE_ELEMS + offs, mask=mask & live,
                other=0.0)
    tl.store(dst_ptr + (kv * num_pages + p).to(tl.int64) * PAGE_ELEMS + offs, x, mask=mask)


@triton.jit
def kv_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                    stride_kt, stride_kh, stride_vt, stride_vh,
                    stride_cb, stride_ct, stride_ch,
                    NUM_KV_HEADS: tl.constexpr, H_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, SAT: tl.constexpr):
    """Grid ``(num_tokens,)``: copy token t's K and V (all heads) to its slot; slot -1 skips.
    SAT > 0 clamps the values to +-SAT first (fp8 caches: saturate, not NaN)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    mask = (offs_h < NUM_KV_HEADS)[:, None]
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct \
        + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if SAT > 0:  # (constexpr: no branch of another type at run time)
        k = tl.clamp(k.to(tl.float32), -SAT, SAT)
        v = tl.clamp(v.to(tl.float32), -SAT, SAT)
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)
