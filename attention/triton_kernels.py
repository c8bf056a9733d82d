"""Triton kernels: unified paged attention (decode rows and prefill chunks), a cascade's shared
prefix and split-KV reduce. Launch logic lives in ``attention.triton_attn``; the KV cache's copies
(write by slot mapping, page gather) in ``attention.triton_cache_kernels``.

Tile rows pack the query heads of one KV head (GQA): row ``m`` is token ``m // G_PAD`` of the
tile and query head ``kv_head * Q_PER_KV + m % G_PAD``, so each K/V tile is loaded once per
group. Scores live in the exp2 domain (``qk_scale`` includes log2(e)); softmax state is fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl

from attention.triton_fp8 import fp8_tile


PAGED = tl.constexpr(0)  # key source of ``_attend``: the paged cache through the block table
ROWS = tl.constexpr(1)  # contiguous rows from ``kv_tok0`` (the step's new K/V), by pointers
DESC = tl.constexpr(2)  # the same rows through tensor descriptors (TMA on Hopper)
PAGED_FP8 = tl.constexpr(3)  # PAGED, an fp8 e4m3 cache with bf16 queries, widened by ``triton_fp8.fp8_tile`` (NVIDIA)


@triton.jit
def _attend(acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, kv_tok0, col, tile_lo, tile_hi, seq_len,
            qk_scale, stride_kb, stride_kt, stride_vt, offs_n, offs_d,
            BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_MODE: tl.constexpr,
            MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over key tiles ``[tile_lo, tile_hi)``; MASKED adds causal/length masks.
    PAGED: V's cache is K's at element offset ``v_base`` (same strides), so one pointer tensor
    serves both (a second one spills registers at 128x128 tiles); PAGED_FP8 likewise, in 32-bit
    words. DESC: ``k_base``/``v_base`` are descriptors of ``[T, Hk * D]`` and ``col`` the head's
    first column."""
    for t in range(tile_lo, tile_hi):
        pos = t * BLOCK_N + offs_n
        if KV_MODE == DESC:
            row0 = kv_tok0 + t * BLOCK_N
            k = k_base.load([row0, col]).to(q.dtype)  # fp8 gathered rows: select in q's type
            v = v_base.load([row0, col]).to(q.dtype)
            if MASKED:  # rows past seq_len belong to other requests (or are out of bounds: 0)
                in_len = (pos < seq_len)[:, None]
                k = tl.where(in_len, k, 0.0)
                v = tl.where(in_len, v, 0.0)
        else:
            if KV_MODE == ROWS:
                rows = (kv_tok0 + pos).to(tl.int64)
                k_ptrs = k_base + (rows * stride_kt)[:, None] + offs_d[None, :]
                v_ptrs = v_base + (rows * stride_vt)[:, None] + offs_d[None, :]
            else:
                if MASKED:
                    blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=pos < seq_len, other=0)
                else:
                    blk = tl.load(bt_row + pos // BLOCK_SIZE)
                blk = blk.to(tl.int64)
                in_blk = pos % BLOCK_SIZE
                k_ptrs = k_base + (blk * stride_kb + in_blk * stride_kt)[:, None] + offs_d[None, :]
                v_ptrs = k_ptrs + v_base
            if KV_MODE == PAGED_FP8:  # offsets in bytes / 4: rows and heads start on word boundaries
                words = k_base.to(tl.pointer_type(tl.uint32), bitcast=True) \
                    + ((blk * stride_kb + in_blk * stride_kt) // 4)[:, None] \
                    + tl.arange(0, offs_d.shape[0] // 4)[None, :]
                in_len = (pos < seq_len)[:, None] if MASKED else None
                k = fp8_tile(words, in_len, BLOCK_N, offs_d.shape[0])
                v = fp8_tile(words + v_base // 4, in_len, BLOCK_N, offs_d.shape[0])
            elif MASKED:
                # rows past seq_len may be NaN garbage: P = 0 times NaN would still poison acc
                in_len = (pos < seq_len)[:, None]
                k = tl.load(k_ptrs, mask=in_len, other=0.0)
                v = tl.load(v_ptrs, mask=in_len, other=0.0)
            else:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC)
        if MASKED:
            keep = (pos[None, :] <= q_pos[:, None]) & (pos[None, :] < seq_len)
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # fully masked row so far
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_ref = m_new
        p = tl.math.exp2(s * qk_scale - m_ref[:, None])  # scale folded into one FMA
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def query_block(qsl_ptr, pid, num_reqs_pad, BLOCK_Q: tl.constexpr):
    """(request, its first token, the block's first token in it) of prefill program ``pid``:
    request ``r`` owns programs from ``qsl[r] // BLOCK_Q + r``; ``num_reqs_pad`` is the virtual
    request of the padding tokens. (Also called by the Gluon prefill kernel.)"""
    lo = 0
    hi = num_reqs_pad
    while lo < hi:  # last request whose first program index is <= pid
        mid = (lo + hi + 1) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= pid:
            lo = mid
        else:
            hi = mid - 1
    q_start = tl.load(qsl_ptr + lo)
    return lo, q_start, (pid - (q_start // BLOCK_Q + lo)) * BLOCK_Q


@triton.jit
def _split_range(split, num_splits, min_tiles_per_split, n_tiles, SPLIT: tl.constexpr):
    """This split's key tiles ``[lo, hi)`` of ``n_tiles`` (all of them without SPLIT)."""
    if SPLIT:
        per = tl.maximum(tl.cdiv(n_tiles, num_splits), min_tiles_per_split)
        lo = split * per
        hi = tl.minimum(lo + per, n_tiles)
    else:
        lo = 0
        hi = n_tiles
    return lo, hi


# block-table and partial strides vary with the step (table width, split count): not specialised,
# so the variants compiled at start-up are the ones every later step runs
@triton.jit(do_not_specialize=["num_tokens", "num_reqs_pad", "num_splits", "stride_bt", "stride_pt", "stride_ph",
                               "slot0"])
def unified_attention_kernel(
        out_ptr, q_ptr, k_ptr, kn_ptr, vn_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, prefix_ptr,
        part_m_ptr, part_l_ptr, part_acc_ptr, gk_ptr, gv_ptr, gfirst_ptr,
        num_tokens, num_reqs_pad, num_splits, min_tiles_per_split, slot0, qk_scale,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_kt, stride_kh, kv_delta,
        stride_knt, stride_knh, stride_vnt, stride_vnh, stride_gt,
        stride_bt, stride_pt, stride_ph,
        Q_PER_KV: tl.constexpr, G_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, IS_DECODE: tl.constexpr, ZERO_PAD: tl.constexpr,
        SPLIT: tl.constexpr, HAS_CACHE: tl.constexpr, NEW_KV: tl.constexpr, CASCADE: tl.constexpr,
        GATHERED: tl.constexpr, CACHE_KV: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid ``(programs, num_kv_heads, num_splits)``.

    IS_DECODE: program ``p`` serves request ``p`` if its q_len is 1 (and, with ZERO_PAD,
    zeroes padding token ``p``). Otherwise programs are query blocks of BLOCK_Q tokens of
    requests with q_len >= 2: request ``r`` owns programs from ``qsl[r] // BLOCK_Q + r``
    (enough for its tokens); index ``num_reqs_pad`` is a virtual request holding the padding
    tokens, zeroed with ZERO_PAD. SPLIT writes unnormalised partials per KV segment, at partial
    slot ``slot0 + split``. CASCADE (decode): the first ``prefix_ptr[0] // BLOCK_N`` key tiles are
    a shared prefix that ``cascade_prefix_kernel`` attended into partial slots ``[0, slot0)``, so
    rows start after it; without SPLIT each row merges those slots itself before it normalises.

    Keys: ``k_ptr`` is the paged K cache (HAS_CACHE; V's is at element offset ``kv_delta``
    with the same strides; CACHE_KV is PAGED, or PAGED_FP8 to widen an fp8 cache by PTX),
    ``kn_ptr``/``vn_ptr`` the step's new K/V rows ``[T, Hk, D]``. A decode row reads all its keys
    from the cache; a prefill block reads the cached prefix from the cache (no causal mask) and
    the request's new tokens from the contiguous new rows (no block-table lookups), so a prompt
    without a cached prefix never gathers pages. NEW_KV (ROWS or DESC) says whether ``kn_ptr``/``vn_ptr`` are
    pointers or tensor descriptors of ``[T, Hk * D]``.

    GATHERED (prefill blocks): the cached prefixes' pages were copied, request after request,
    into contiguous rows ``gk_ptr``/``gv_ptr`` (``[pages * BLOCK_SIZE, Hk, D]``, read like the new
    rows, NEW_KV); request ``r``'s prefix starts at page ``gfirst_ptr[r]`` of them. Every query
    block of a long row then reads its prefix by whole tiles (TMA on Hopper), not page by page.
    """
    if IS_DECODE:
        pid = tl.program_id(0)
    else:  # heaviest (latest) query blocks first: shorter tail under causal imbalance
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_tok = offs_m // G_PAD
    row_g = offs_m % G_PAD
    head = kvh * Q_PER_KV + row_g
    row_ok = (row_tok < BLOCK_Q) & (row_g < Q_PER_KV)
    n_real = tl.load(qsl_ptr + num_reqs_pad)
    o_cols = head[:, None] * stride_oh + offs_d[None, :]

    if IS_DECODE:
        if ZERO_PAD:
            if (pid >= n_real) & (pid < num_tokens):
                zero = tl.zeros([BLOCK_M, HEAD_DIM], dtype=out_ptr.dtype.element_ty)
                tl.store(out_ptr + pid.to(tl.int64) * stride_ot + o_cols, zero,
                         mask=(row_ok & (row_tok == 0))[:, None])
        if pid >= num_reqs_pad:
            return
        req = pid
        q_start = tl.load(qsl_ptr + req)
        q_len = tl.load(qsl_ptr + req + 1) - q_start
        if q_len != 1:
            return
        q_off = 0
    else:
        req, q_start, q_off = query_block(qsl_ptr, pid, num_reqs_pad, BLOCK_Q)
        if req == num_reqs_pad:
            if ZERO_PAD:
                toks = q_start + q_off + row_tok
                zero = tl.zeros([BLOCK_M, HEAD_DIM], dtype=out_ptr.dtype.element_ty)
                tl.store(out_ptr + toks.to(tl.int64)[:, None] * stride_ot + o_cols, zero,
                         mask=(row_ok & (toks < num_tokens))[:, None])
            return
        q_len = tl.load(qsl_ptr + req + 1) - q_start
        if (q_len < 2) | (q_off >= q_len):
            return

    if HAS_CACHE:
        seq_len = tl.load(seq_lens_ptr + req)
    else:
        seq_len = q_len
    ctx = seq_len - q_len  # cached prefix before the new tokens
    tok_in_req = q_off + row_tok
    row_ok = row_ok & (tok_in_req < q_len)
    tok = (q_start + tok_in_req).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    if NEW_KV == DESC:
        kn_base, vn_base, kn_col = kn_ptr, vn_ptr, kvh * HEAD_DIM
    else:
        kn_base, vn_base, kn_col = kn_ptr + kvh * stride_knh, vn_ptr + kvh * stride_vnh, 0
    if IS_DECODE:  # one range of keys: [0, seq_len) from the cache, or the new rows without one
        q_pos = ctx + tok_in_req
        n_tiles = tl.cdiv(seq_len, BLOCK_N)
        n_full = (ctx + 1) // BLOCK_N  # tiles every row sees whole: no masks
        if CASCADE:  # the device holds the prefix length: one captured graph serves any prefix
            tile0 = tl.load(prefix_ptr) // BLOCK_N
        else:
            tile0 = 0
        lo_t, hi_t = _split_range(split, num_splits, min_tiles_per_split, n_tiles - tile0, SPLIT)
        lo_t, hi_t = lo_t + tile0, hi_t + tile0
        if HAS_CACHE:
            k_base, v_base, s_kt, s_vt = k_ptr + kvh * stride_kh, kv_delta, stride_kt, 0
        else:
            k_base, v_base, s_kt, s_vt = kn_base, vn_base, stride_knt, stride_vnt
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, q_start, kn_col,
                                lo_t, tl.minimum(hi_t, n_full), seq_len, qk_scale,
                                stride_kb, s_kt, s_vt, offs_n, offs_d,
                                BLOCK_N, BLOCK_SIZE, CACHE_KV if HAS_CACHE else NEW_KV, False, DOT_PREC)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, q_pos, k_base, v_base, bt_row, q_start, kn_col,
                                tl.maximum(lo_t, n_full), hi_t, seq_len, qk_scale,
                                stride_kb, s_kt, s_vt, offs_n, offs_d,
                                BLOCK_N, BLOCK_SIZE, CACHE_KV if HAS_CACHE else NEW_KV, True, DOT_PREC)
    else:
        # tile space: the cached prefix's tiles [0, n_ctx), then the new tokens' [n_ctx, n_tiles)
        n_ctx = tl.cdiv(ctx, BLOCK_N)
        new_end = tl.minimum(q_off + BLOCK_Q, q_len)  # new keys this block can see
        n_tiles = n_ctx + tl.cdiv(new_end, BLOCK_N)
        lo_t, hi_t = _split_range(split, num_splits, min_tiles_per_split, n_tiles, SPLIT)
        if HAS_CACHE:  # every cached key precedes every query: only the last tile is masked (length)
            pos_after = ctx + tok_in_req
            n_ctx_full = ctx // BLOCK_N
            if GATHERED:  # the prefix as contiguous rows from this request's first gathered page
                g0 = tl.load(gfirst_ptr + req) * BLOCK_SIZE
                if NEW_KV == DESC:
                    gk_base, gv_base = gk_ptr, gv_ptr
                else:
                    gk_base, gv_base = gk_ptr + kvh * HEAD_DIM, gv_ptr + kvh * HEAD_DIM
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, pos_after, gk_base, gv_base, bt_row, g0, kn_col,
                                        lo_t, tl.minimum(hi_t, n_ctx_full), ctx, qk_scale,
                                        0, stride_gt, stride_gt, offs_n, offs_d,
                                        BLOCK_N, BLOCK_SIZE, NEW_KV, False, DOT_PREC)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, pos_after, gk_base, gv_base, bt_row, g0, kn_col,
                                        tl.maximum(lo_t, n_ctx_full), tl.minimum(hi_t, n_ctx), ctx,
                                        qk_scale, 0, stride_gt, stride_gt, offs_n, offs_d,
                                        BLOCK_N, BLOCK_SIZE, NEW_KV, True, DOT_PREC)
            else:
                k_base = k_ptr + kvh * stride_kh
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, pos_after, k_base, kv_delta, bt_row, 0, 0,
                                        lo_t, tl.minimum(hi_t, n_ctx_full), ctx, qk_scale,
                                        stride_kb, stride_kt, 0, offs_n, offs_d,
                                        BLOCK_N, BLOCK_SIZE, PAGED, False, DOT_PREC)
                acc, m_i, l_i = _attend(acc, m_i, l_i, q, pos_after, k_base, kv_delta, bt_row, 0, 0,
                                        tl.maximum(lo_t, n_ctx_full), tl.minimum(hi_t, n_ctx), ctx,
                                        qk_scale, stride_kb, stride_kt, 0,
                                        offs_n, offs_d, BLOCK_N, BLOCK_SIZE, CACHE_KV, True, DOT_PREC)
        # the new tokens, causal, positions relative to the first new token
        lo_n = tl.maximum(lo_t - n_ctx, 0)
        hi_n = tl.maximum(hi_t - n_ctx, 0)
        n_new_full = (q_off + 1) // BLOCK_N
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, tok_in_req, kn_base, vn_base, bt_row, q_start, kn_col,
                                lo_n, tl.minimum(hi_n, n_new_full), q_len, qk_scale,
                                0, stride_knt, stride_vnt, offs_n, offs_d,
                                BLOCK_N, BLOCK_SIZE, NEW_KV, False, DOT_PREC)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, tok_in_req, kn_base, vn_base, bt_row, q_start, kn_col,
                                tl.maximum(lo_n, n_new_full), hi_n, q_len, qk_scale,
                                0, stride_knt, stride_vnt, offs_n, offs_d,
                                BLOCK_N, BLOCK_SIZE, NEW_KV, True, DOT_PREC)

    if SPLIT:
        pidx = tok * stride_pt + head * stride_ph + slot0 + split
        tl.store(part_m_ptr + pidx, m_i, mask=row_ok)
        tl.store(part_l_ptr + pidx, l_i, mask=row_ok)
        tl.store(part_acc_ptr + pidx[:, None] * HEAD_DIM + offs_d[None, :], acc,
                 mask=row_ok[:, None])
    else:
        if CASCADE:  # merge the shared prefix's partials (slots [0, slot0)) into this row's state
            pbase = tok * stride_pt + head * stride_ph
            for s in range(0, slot0):
                m_s = tl.load(part_m_ptr + pbase + s, mask=row_ok, other=float("-inf"))
                l_s = tl.load(part_l_ptr + pbase + s, mask=row_ok, other=0.0)
                acc_s = tl.load(part_acc_ptr + (pbase + s)[:, None] * HEAD_DIM + offs_d[None, :],
                                mask=row_ok[:, None], other=0.0)
                m_new = tl.maximum(m_i, m_s)
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
                a_i = tl.math.exp2(m_i - m_ref)
                a_s = tl.math.exp2(m_s - m_ref)
                acc = acc * a_i[:, None] + acc_s * a_s[:, None]
                l_i = l_i * a_i + l_s * a_s
                m_i = m_new
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + o_cols, out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_reqs_pad", "stride_pt", "stride_ph"])
def cascade_prefix_kernel(q_ptr, k_ptr, bt_ptr, qsl_ptr, prefix_ptr, part_m_ptr, part_l_ptr, part_acc_ptr,
                          num_reqs_pad, qk_scale,
                          stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, kv_delta,
                          stride_pt, stride_ph,
                          Q_PER_KV: tl.constexpr, G_PAD: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_TILE: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, CACHE_KV: tl.constexpr,
                          DOT_PREC: tl.constexpr):
    """Grid ``(cdiv(num_reqs_pad, BLOCK_R), num_kv_heads, prefix splits)``: cascade attention's
    shared part. Every decode request of the step reads the same pages for its first
    ``prefix_ptr[0]`` keys (rounded down to the decode role's ``KEY_TILE``, where its rows
    start), so a program takes the query rows of ``BLOCK_R`` requests x the group's heads and
    attends them over split ``s``'s share of those keys' tiles, read once through request 0's
    block table; it writes unnormalised partials at slot ``s`` (empty splits: no mass), which
    the decode rows merge. The length is read on the device, so a captured graph serves every
    prefix. Rows of requests that do not decode this step (padding) are skipped. CACHE_KV as in
    ``unified_attention_kernel`` (PAGED, or PAGED_FP8 to widen an fp8 cache by PTX)."""
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    req = tl.program_id(0) * BLOCK_R + offs_m // G_PAD
    head = kvh * Q_PER_KV + offs_m % G_PAD
    row_ok = (offs_m % G_PAD < Q_PER_KV) & (req < num_reqs_pad)
    tok = tl.load(qsl_ptr + req, mask=row_ok, other=0)
    row_ok = row_ok & (tl.load(qsl_ptr + req + 1, mask=row_ok, other=0) - tok == 1)
    tok = tok.to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    prefix_tiles = tl.load(prefix_ptr) // KEY_TILE * (KEY_TILE // BLOCK_N)
    per = tl.cdiv(prefix_tiles, tl.num_programs(2))
    lo = split * per
    hi = tl.minimum(lo + per, prefix_tiles)
    acc, m_i, l_i = _attend(acc, m_i, l_i, q, offs_m, k_ptr + kvh * stride_kh, kv_delta, bt_ptr, 0, 0,
                            lo, hi, prefix_tiles * BLOCK_N, qk_scale, stride_kb, stride_kt, 0, offs_n, offs_d,
                            BLOCK_N, BLOCK_SIZE, CACHE_KV, False, DOT_PREC)
    pidx = tok * stride_pt + head * stride_ph + split
    tl.store(part_m_ptr + pidx, m_i, mask=row_ok)
    tl.store(part_l_ptr + pidx, l_i, mask=row_ok)
    tl.store(part_acc_ptr + pidx[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=["num_reqs_pad", "num_splits", "stride_pt", "stride_ph"])
def split_reduce_kernel(out_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, qsl_ptr,
                        num_reqs_pad, num_splits, stride_ot, stride_oh, stride_pt, stride_ph,
                        HEAD_DIM: tl.constexpr, S_PAD: tl.constexpr):
    """Grid ``(num_tokens, num_heads)``: combine the split partials; padding tokens get 0."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    real = t < tl.load(qsl_ptr + num_reqs_pad)
    smask = offs_s < tl.where(real, num_splits, 0)  # padding token: no split is read
    base = t * stride_pt + h * stride_ph
    m = tl.load(part_m_ptr + base + offs_s, mask=smask, other=float("-inf"))
    live = smask & (m > float("-inf"))
    m_max = tl.max(m, 0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(live, tl.math.exp2(m - m_ref), 0.0)
    l_sum = tl.sum(w * tl.load(part_l_ptr + base + offs_s, mask=live, other=0.0), 0)
    acc = tl.load(part_acc_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                  mask=live[:, None], other=0.0)
    o = tl.sum(acc * w[:, None], 0) / tl.where(l_sum > 0.0, l_sum, 1.0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))
