"""The Triton backend's prefill blocks on Hopper (sm90), written in Gluon (Triton's explicit layer):
the same programs, query rows and key ranges as ``unified_attention_kernel``'s prefill launch,
scheduled the way Triton's compiler does not schedule them for sm90 (FlashAttention-3's plan):

* warp specialisation: one loader warp brings K and V tiles by TMA into a ring of shared-memory
  stages; two math warpgroups take 64 of the block's 128 query rows each and release a stage
  as soon as their wgmma reading it retires. The two groups run out of step, so one's softmax
  runs on the CUDA cores while the other's matrix products run on the tensor cores;
* within a group, S_t = Q K_t^T is issued before O += P_{t-1} V_{t-1}, and tile t's softmax
  runs while that P V finishes.

Keys: the step's new rows (a descriptor of ``[T, Hk * D]``) and, with GATHERED, the cached
prefixes copied to contiguous rows by ``gather_pages`` (rows past each prefix are zero there, so
V needs no mask). A step whose prefill rows read a cached prefix page by page, a split-KV step or
another GPU keeps the unified kernel (``triton_attn._gluon_refusal`` says why).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from platforms.triton_support import compute_capability, interpreting

try:  # Gluon ships with triton >= 3.5; without it (or on the CPU) the Triton kernel serves
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                   warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from attention.triton_kernels import query_block
    # the TMA load's name: async_copy_global_to_shared up to triton 3.6, async_load after it
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
except Exception:  # noqa: BLE001 - any import failure means "not available"
    gluon = None

BLOCK_M = 128  # query rows (tokens x group heads) a program, as the unified kernel's prefill tile


@dataclass(frozen=True)
class GluonTile:
    """Key rows a tile and K/V stages in shared memory. ``TILE`` is what the backend launches."""
    block_n: int = 128
    stages: int = 2


TILE = GluonTile()


def unavailable_reason(device_type: str, capability: int | None, dtype: torch.dtype, keys_dtype: torch.dtype,
                       head_dim: int, block_m: int) -> str | None:
    """Why a prefill launch cannot take the Gluon kernel (None: it can): it needs Gluon, an sm90
    GPU (``capability`` 90: wgmma), 16-bit queries with keys of the same type (the new rows, and
    the cache's when a prefix is gathered), head_dim 128 and 128-row query blocks."""
    if gluon is None:
        return "this triton has no Gluon (triton.experimental.gluon, triton >= 3.5)"
    if device_type != "cuda" or capability != 90:
        return "the Gluon prefill kernel is written for sm90 (Hopper) GPUs"
    if dtype not in (torch.bfloat16, torch.float16) or keys_dtype != dtype:
        return f"the Gluon prefill kernel needs float16/bfloat16 queries and keys alike, got {dtype}/{keys_dtype}"
    if head_dim != 128 or block_m != BLOCK_M:
        return f"the Gluon prefill kernel needs head_dim 128 and {BLOCK_M}-row query blocks"
    return None


def device_capability(device: torch.device) -> int | None:
    """``major * 10 + minor`` of a CUDA device as the compiler targets it (None elsewhere and under
    the interpreter)."""
    return compute_capability() if device.type == "cuda" and not interpreting() else None


if gluon is not None:
    @gluon.jit
    def _load_tile(desc_new, desc_pre, t, n_ctx, row_new, row_pre, col, bar, dst, BLOCK_N: gl.constexpr):
        """TMA of key tile ``t`` (prefix rows for ``t < n_ctx``, else new rows) into ``dst``."""
        mbarrier.expect(bar, desc_new.block_type.nbytes)
        if t < n_ctx:
            _tma_load(desc_pre, [row_pre + t * BLOCK_N, col], bar, dst)
        else:
            _tma_load(desc_new, [row_new + (t - n_ctx) * BLOCK_N, col], bar, dst)

    @gluon.jit
    def _softmax_step(s, m_i, l_i, t, n_ctx, ctx, q_len, tok_in_req, mask_from_pre, mask_from_new, qk_scale,
                      BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
        """Mask (only tiles that need it), then the online-softmax update of tile ``t``: returns
        (p, alpha, m_new, l_new), p unnormalised in fp32."""
        need = ((t < n_ctx) & (t >= mask_from_pre)) | ((t >= n_ctx) & (t - n_ctx >= mask_from_new))
        if need:
            offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            if t < n_ctx:  # cached keys precede every query: only the prefix length masks
                keep = gl.expand_dims(t * BLOCK_N + offs_n < ctx, 0) & gl.expand_dims(tok_in_req >= 0, 1)
            else:
                kpos = (t - n_ctx) * BLOCK_N + offs_n
                keep = (gl.expand_dims(kpos, 0) <= gl.expand_dims(tok_in_req, 1)) & gl.expand_dims(kpos < q_len, 0)
            s = gl.where(keep, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        m_ref = gl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_ref, 1))
        alpha = gl.exp2(m_i - m_ref)
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)

    @gluon.jit
    def _produce(kn_desc, vn_desc, gk_desc, gv_desc, k_smem, v_smem, bars, n_tiles, n_ctx, row_new, row_pre, col,
                 BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
        """The loader warp: K and V of every key tile by TMA into the stage ring, each into its
        stage once the consumers have released it (a fresh stage passes at once: parity 1)."""
        for t in range(n_tiles):
            st = t % STAGES
            free = ((t // STAGES) & 1) ^ 1
            mbarrier.wait(bars.index(2 * STAGES + st), free)
            _load_tile(kn_desc, gk_desc, t, n_ctx, row_new, row_pre, col, bars.index(st), k_smem.index(st),
                       BLOCK_N)
            mbarrier.wait(bars.index(3 * STAGES + st), free)
            _load_tile(vn_desc, gv_desc, t, n_ctx, row_new, row_pre, col, bars.index(STAGES + st),
                       v_smem.index(st), BLOCK_N)

    @gluon.jit
    def _consume(q_smem, k_smem, v_smem, bars, out_ptr, n_tiles, n_ctx, ctx, q_len, q_start, q_off, kvh,
                 mask_from_pre, mask_from_new, qk_scale, stride_ot, stride_oh, ROW0: gl.constexpr,
                 ROWS: gl.constexpr, Q_PER_KV: gl.constexpr, G_PAD: gl.constexpr, BLOCK_Q: gl.constexpr,
                 BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        """Math warps for query rows ``[ROW0, ROW0 + ROWS)`` of the block: S_t = Q K_t^T is issued,
        then O += P_{t-1} V_{t-1}; S_t retires with the P V still running, so tile t's softmax
        overlaps it. Each stage is released once read; then O is normalised and stored."""
        nw: gl.constexpr = gl.num_warps()
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[nw, 1],
                                                           instr_shape=[16, HEAD_DIM, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        dtype: gl.constexpr = q_smem.dtype
        q_rows = q_smem.slice(ROW0, ROWS)
        tok_in_req = q_off + (ROW0 + gl.arange(0, ROWS, layout=row_s)) // G_PAD
        m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
        l_i = gl.zeros([ROWS], gl.float32, row_s)
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)

        mbarrier.wait(bars.index(0), 0)  # tile 0: its scores and softmax, nothing to overlap yet
        s = warpgroup_mma(q_rows, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=[s])
        mbarrier.arrive(bars.index(2 * STAGES))
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, n_ctx, ctx, q_len, tok_in_req, mask_from_pre,
                                           mask_from_new, qk_scale, BLOCK_N, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for t in range(1, n_tiles):
            st = t % STAGES
            mbarrier.wait(bars.index(st), (t // STAGES) & 1)
            s = warpgroup_mma(q_rows, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            sp = (t - 1) % STAGES
            mbarrier.wait(bars.index(STAGES + sp), ((t - 1) // STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(sp), acc, is_async=True)
            s = warpgroup_mma_wait(1, deps=[s])
            mbarrier.arrive(bars.index(2 * STAGES + st))  # K_t read
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, t, n_ctx, ctx, q_len, tok_in_req, mask_from_pre,
                                               mask_from_new, qk_scale, BLOCK_N, s_layout)
            acc, p_op = warpgroup_mma_wait(0, deps=[acc, p_op])
            mbarrier.arrive(bars.index(3 * STAGES + sp))  # V_{t-1} read
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
        sp = (n_tiles - 1) % STAGES
        mbarrier.wait(bars.index(STAGES + sp), ((n_tiles - 1) // STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(sp), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=[acc, p_op])[0]

        l_o = gl.convert_layout(l_i, row_o)
        o = acc / gl.expand_dims(gl.where(l_o > 0.0, l_o, 1.0), 1)
        rows = ROW0 + gl.arange(0, ROWS, layout=row_o)
        tok = q_off + rows // G_PAD
        ok = (rows // G_PAD < BLOCK_Q) & (rows % G_PAD < Q_PER_KV) & (tok < q_len)
        cols = gl.expand_dims((kvh * Q_PER_KV + rows % G_PAD) * stride_oh, 1) \
            + gl.expand_dims(gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout)), 0)
        gl.store(out_ptr + gl.expand_dims((q_start + tok).to(gl.int64) * stride_ot, 1) + cols, o.to(dtype),
                 mask=gl.expand_dims(ok, 1))

    @gluon.jit
    def _consume_upper(q_smem, k_smem, v_smem, bars, out_ptr, n_tiles, n_ctx, ctx, q_len, q_start, q_off, kvh,
                       mask_from_pre, mask_from_new, qk_scale, stride_ot, stride_oh, ROWS: gl.constexpr,
                       Q_PER_KV: gl.constexpr, G_PAD: gl.constexpr, BLOCK_Q: gl.constexpr, BLOCK_N: gl.constexpr,
                       HEAD_DIM: gl.constexpr, STAGES: gl.constexpr):
        """The second consumer warpgroup: the block's rows ``[ROWS, 2 * ROWS)``."""
        _consume(q_smem, k_smem, v_smem, bars, out_ptr, n_tiles, n_ctx, ctx, q_len, q_start, q_off, kvh,
                 mask_from_pre, mask_from_new, qk_scale, stride_ot, stride_oh, ROWS, ROWS, Q_PER_KV, G_PAD,
                 BLOCK_Q, BLOCK_N, HEAD_DIM, STAGES)

    @gluon.jit(do_not_specialize=["num_tokens", "num_reqs_pad"])
    def hopper_prefill_kernel(out_ptr, q_ptr, kn_desc, vn_desc, gk_desc, gv_desc, gfirst_ptr, seq_lens_ptr, qsl_ptr,
                              num_tokens, num_reqs_pad, qk_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                              Q_PER_KV: gl.constexpr, G_PAD: gl.constexpr, BLOCK_Q: gl.constexpr,
                              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                              BLOCK_SIZE: gl.constexpr, HAS_CACHE: gl.constexpr, GATHERED: gl.constexpr,
                              ZERO_PAD: gl.constexpr, STAGES: gl.constexpr):
        """Grid ``(programs, num_kv_heads)``: program ``p`` is the query block of
        ``unified_attention_kernel``'s prefill launch (same request search, heaviest first, the
        virtual padding request zeroed with ZERO_PAD); no split. Warp-specialised: one loader warp
        (TMA) and two math warpgroups (the kernel's 4 warps and a worker's 4) taking half the rows
        each, out of step: one's softmax beside the other's matrix products. (Eight warps in one
        math partition were 20-25% slower on an H200.)"""
        nw: gl.constexpr = gl.num_warps()
        ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [nw, 1], [1, 0])
        dtype: gl.constexpr = q_ptr.dtype.element_ty

        pid = gl.num_programs(0) - 1 - gl.program_id(0)  # heaviest (latest) query blocks first
        kvh = gl.program_id(1)
        req, q_start, q_off = query_block(qsl_ptr, pid, num_reqs_pad, BLOCK_Q)
        offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, ld_layout))
        if req == num_reqs_pad:
            if ZERO_PAD:
                toks = q_start + q_off + offs_m // G_PAD
                ok = (offs_m // G_PAD < BLOCK_Q) & (offs_m % G_PAD < Q_PER_KV) & (toks < num_tokens)
                cols = gl.expand_dims((kvh * Q_PER_KV + offs_m % G_PAD) * stride_oh, 1) + gl.expand_dims(offs_d, 0)
                gl.store(out_ptr + gl.expand_dims(toks.to(gl.int64) * stride_ot, 1) + cols,
                         gl.zeros([BLOCK_M, HEAD_DIM], dtype, ld_layout), mask=gl.expand_dims(ok, 1))
            return
        q_len = gl.load(qsl_ptr + req + 1) - q_start
        if (q_len < 2) | (q_off >= q_len):
            return
        if HAS_CACHE:
            ctx = gl.load(seq_lens_ptr + req) - q_len
        else:
            ctx = 0
        if GATHERED:
            n_ctx = gl.cdiv(ctx, BLOCK_N)
            row_pre = gl.load(gfirst_ptr + req) * BLOCK_SIZE
        else:
            n_ctx = 0
            row_pre = 0
        n_tiles = n_ctx + gl.cdiv(gl.minimum(q_off + BLOCK_Q, q_len), BLOCK_N)
        mask_from_pre = ctx // BLOCK_N  # prefix tiles from here on hold keys past the prefix
        mask_from_new = (q_off + 1) // BLOCK_N  # new-key tiles from here on cross the diagonal

        # Q: rows are (token, group head) pairs; loaded once through registers into shared memory
        q_tok = q_off + offs_m // G_PAD
        q_ok = (offs_m // G_PAD < BLOCK_Q) & (offs_m % G_PAD < Q_PER_KV) & (q_tok < q_len)
        q_rows = (q_start + q_tok).to(gl.int64) * stride_qt + (kvh * Q_PER_KV + offs_m % G_PAD) * stride_qh
        q = gl.load(q_ptr + gl.expand_dims(q_rows, 1) + gl.expand_dims(offs_d, 0), mask=gl.expand_dims(q_ok, 1),
                    other=0.0)
        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM],
                                           gl.NVMMASharedLayout.get_default_for([BLOCK_M, HEAD_DIM], dtype), q)
        k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kn_desc.layout)
        v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], vn_desc.layout)
        bars = gl.allocate_shared_memory(gl.int64, [4 * STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(2 * STAGES):  # K, V landed (the loader's TMA); then K, V read (consumers)
            mbarrier.init(bars.index(i), count=1)
            mbarrier.init(bars.index(2 * STAGES + i), count=2)
        fence_async_shared()
        gl.warp_specialize([
            (_consume, (q_smem, k_smem, v_smem, bars, out_ptr, n_tiles, n_ctx, ctx, q_len, q_start, q_off, kvh,
                        mask_from_pre, mask_from_new, qk_scale, stride_ot, stride_oh, 0, BLOCK_M // 2,
                        Q_PER_KV, G_PAD, BLOCK_Q, BLOCK_N, HEAD_DIM, STAGES)),
            (_consume_upper, (q_smem, k_smem, v_smem, bars, out_ptr, n_tiles, n_ctx, ctx, q_len, q_start, q_off,
                              kvh, mask_from_pre, mask_from_new, qk_scale, stride_ot, stride_oh, BLOCK_M // 2,
                              Q_PER_KV, G_PAD, BLOCK_Q, BLOCK_N, HEAD_DIM, STAGES)),
            (_produce, (kn_desc, vn_desc, gk_desc, gv_desc, k_smem, v_smem, bars, n_tiles, n_ctx, q_start,
                        row_pre, kvh * HEAD_DIM, BLOCK_N, STAGES)),
        ], [nw, 1], [240, 24])
        for i in gl.static_range(4 * STAGES):
            mbarrier.invalidate(bars.index(i))


def _descriptor(rows: torch.Tensor, block_n: int) -> "TensorDescriptor":
    """A TMA descriptor of ``[T, Hk, D]`` rows as ``[T, Hk * D]``, one key tile a box."""
    tokens, heads, d = rows.shape
    dt = gl.bfloat16 if rows.dtype == torch.bfloat16 else gl.float16
    layout = gl.NVMMASharedLayout.get_default_for([block_n, d], dt)
    return TensorDescriptor(rows, shape=[tokens, heads * d], strides=[rows.stride(0), 1],
                            block_shape=[block_n, d], layout=layout)


def hopper_prefill(out: torch.Tensor, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                   gathered: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, seq_lens: torch.Tensor,
                   query_start_loc: torch.Tensor, qk_scale: float, programs: int, q_per_kv: int, g_pad: int,
                   block_q: int, block_size: int, has_cache: bool, zero_pad: bool) -> None:
    """Launch the prefill blocks of one step into ``out`` (decode rows are left to the caller's
    decode launch). ``gathered``: (K rows, V rows, first page per request) of ``gather_pages``."""
    tile = TILE
    num_kv_heads = k_new.shape[1]
    kn, vn = _descriptor(k_new, tile.block_n), _descriptor(v_new, tile.block_n)
    gk, gv, gfirst = (_descriptor(gathered[0], tile.block_n), _descriptor(gathered[1], tile.block_n), gathered[2]) \
        if gathered else (kn, vn, seq_lens)
    hopper_prefill_kernel[(programs, num_kv_heads)](
        out, q, kn, vn, gk, gv, gfirst, seq_lens, query_start_loc, out.shape[0], seq_lens.shape[0], qk_scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        Q_PER_KV=q_per_kv, G_PAD=g_pad, BLOCK_Q=block_q, BLOCK_M=BLOCK_M, BLOCK_N=tile.block_n, HEAD_DIM=q.shape[-1],
        BLOCK_SIZE=block_size, HAS_CACHE=has_cache, GATHERED=gathered is not None, ZERO_PAD=zero_pad,
        STAGES=tile.stages, num_warps=4)
