"""Triton kernels for the decoder's elementwise ops: residual add + RMSNorm, SiLU-and-mul, and
neox RoPE on q and k. Launch logic and the torch-equivalence contract live in ``models.fused_ops``.

Every kernel rounds where torch eager rounds (16-bit values are widened to float32 for each op
and the result is cast back, as torch's ``opmath`` does), so 16-bit outputs match torch's
bit for bit except where a float32 reduction or ``exp`` differs in its last bits.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

# The interpreter's float32 -> bfloat16 cast truncates; GPUs round to nearest even, as torch does.
_SOFT_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _cast(x, dt: tl.constexpr):
    """float32 ``x`` to ``dt``, rounded to nearest even (emulated for bf16 in the interpreter)."""
    if _SOFT_BF16 and dt == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(dt), r)
    else:
        return x.to(dt)


@triton.jit(do_not_specialize=["n_rows"])
def add_rmsnorm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_rows, n_cols, inner,
                       stride_xa, stride_xb, stride_ra, stride_rb, eps,
                       HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows ``[A, B, N]`` (row r = (r // inner, r % inner)); ``ROWS`` rows per program, the
    whole row in one block. Outputs are contiguous ``[n_rows, N]``."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    a, b = rows // inner, rows % inner
    x = tl.load(x_ptr + (a * stride_xa + b * stride_xb)[:, None] + cols[None, :], mask=mask, other=0.0)
    out_offs = rows[:, None] * n_cols + cols[None, :]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + (a * stride_ra + b * stride_rb)[:, None] + cols[None, :], mask=mask, other=0.0)
        x = _cast(r.to(tl.float32) + x.to(tl.float32), x_ptr.dtype.element_ty)  # residual + x, rounded
        tl.store(res_out_ptr + out_offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    normed = _cast(xf * rstd[:, None], x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0)
    y = w.to(tl.float32)[None, :] * normed.to(tl.float32)  # exact in fp32, one rounding below
    tl.store(out_ptr + out_offs, _cast(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_o, BLOCK: tl.constexpr):
    """Grid ``(rows, cdiv(I, BLOCK))``: ``out[r, c] = silu(x[r, c]) * x[r, I + c]``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    base = x_ptr + row * stride_x
    g = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(base + n_cols + cols, mask=mask, other=0.0)
    s = _cast(g / (1.0 + tl.exp(-g)), x_ptr.dtype.element_ty)  # torch: silu in fp32, rounded
    y = s.to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, _cast(y, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(x_base, o_base, stride_h, stride_oh, cos, sin, offs_d, d_ok,
                  NUM_HEADS: tl.constexpr, HALF: tl.constexpr, H_PAD: tl.constexpr):
    """All heads of one token: ``(x1*cos - x2*sin, x2*cos + x1*sin)``, each product and each
    sum rounded to the activations' dtype, as torch eager does."""
    offs_h = tl.arange(0, H_PAD)
    mask = (offs_h < NUM_HEADS)[:, None] & d_ok[None, :]
    src = x_base + offs_h[:, None] * stride_h + offs_d[None, :]
    dt = o_base.dtype.element_ty
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    c, s = cos[None, :], sin[None, :]
    o1 = _cast(_cast(x1 * c, dt).to(tl.float32) - _cast(x2 * s, dt).to(tl.float32), dt)
    o2 = _cast(_cast(x2 * c, dt).to(tl.float32) + _cast(x1 * s, dt).to(tl.float32), dt)
    dst = o_base + offs_h[:, None] * stride_oh + offs_d[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + HALF, o2, mask=mask)


@triton.jit
def rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr,
                  stride_qt, stride_qh, stride_kt, stride_kh,
                  stride_qot, stride_qoh, stride_kot, stride_koh, stride_cache,
                  NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, HALF: tl.constexpr,
                  HQ_PAD: tl.constexpr, HK_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    """Grid ``(tokens,)``: token t's q and k heads rotated by the cache rows of its position.
    cos/sin are cast to the activations' dtype first (HF does), then widened for the products."""
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    d_ok = offs_d < HALF
    dt = qo_ptr.dtype.element_ty
    cos = _cast(tl.load(cos_ptr + pos * stride_cache + offs_d, mask=d_ok, other=0.0).to(tl.float32), dt)
    sin = _cast(tl.load(sin_ptr + pos * stride_cache + offs_d, mask=d_ok, other=0.0).to(tl.float32), dt)
    cos, sin = cos.to(tl.float32), sin.to(tl.float32)
    _rotate_heads(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, stride_qh, stride_qoh, cos, sin,
                  offs_d, d_ok, NUM_Q_HEADS, HALF, HQ_PAD)
    _rotate_heads(k_ptr + t * stride_kt, ko_ptr + t * stride_kot, stride_kh, stride_koh, cos, sin,
                  offs_d, d_ok, NUM_K_HEADS, HALF, HK_PAD)


# GEMV: y = prologue(x) W^T (+ b) for one row (decode at batch 1), reading W once at memory speed,
# with the op that precedes the projection in the decoder fused in front of it. PROLOGUE: 0 none,
# 1 RMSNorm, 2 residual add + RMSNorm, 3 SiLU-and-mul (models.fused_ops names them).


@triton.jit
def _gemv_w(w_rows, ks, k_ok, col_ok, EVEN: tl.constexpr):
    """The weight tile ``[BLOCK_N, BLOCK_K]`` at columns ``ks``."""
    if EVEN:
        return tl.load(w_rows + ks[None, :])
    return tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)


@triton.jit
def _gemv_vec(ptr, ks, k_ok, EVEN: tl.constexpr):
    if EVEN:
        return tl.load(ptr + ks).to(tl.float32)
    return tl.load(ptr + ks, mask=k_ok, other=0.0).to(tl.float32)


@triton.jit
def _gemv_step(acc, ss, w, x_ptr, res_ptr, nw_ptr, ks, k_ok, K,
               PROLOGUE: tl.constexpr, DT: tl.constexpr, EVEN: tl.constexpr):
    """``acc += w * a`` for the prologue's ``a`` at columns ``ks``; ``ss`` gathers the norm's squares."""
    if PROLOGUE == 3:
        g = _gemv_vec(x_ptr, ks, k_ok, EVEN)
        u = _gemv_vec(x_ptr + K, ks, k_ok, EVEN)
        a = _cast(_cast(g / (1.0 + tl.exp(-g)), DT).to(tl.float32) * u, DT).to(tl.float32)
    else:
        a = _gemv_vec(x_ptr, ks, k_ok, EVEN)
        if PROLOGUE == 2:
            a = _cast(_gemv_vec(res_ptr, ks, k_ok, EVEN) + a, DT).to(tl.float32)
        if PROLOGUE != 0:
            ss += a * a
            a = a * _gemv_vec(nw_ptr, ks, k_ok, EVEN)
    return acc + w.to(tl.float32) * a[None, :], ss


@triton.jit
def _rope_pairs(y, pos_ptr, cos_ptr, sin_ptr, stride_cache, j0, rotate,
                DT: tl.constexpr, BLOCK_N: tl.constexpr):
    """``y`` = rows ``[j0 .. j0+P)`` then their partners ``+ D/2`` of one head (P = BLOCK_N/2),
    each rounded to ``DT``: rotated as ``rotary_kernel`` rotates them where ``rotate``."""
    P: tl.constexpr = BLOCK_N // 2
    a, b = tl.split(tl.permute(tl.reshape(y, (2, P)), (1, 0)))
    pos = tl.load(pos_ptr).to(tl.int64)
    j = j0 + tl.arange(0, P)
    c = _cast(tl.load(cos_ptr + pos * stride_cache + j), DT).to(tl.float32)
    s = _cast(tl.load(sin_ptr + pos * stride_cache + j), DT).to(tl.float32)
    ra = _cast(_cast(a * c, DT).to(tl.float32) - _cast(b * s, DT).to(tl.float32), DT).to(tl.float32)
    rb = _cast(_cast(b * c, DT).to(tl.float32) + _cast(a * s, DT).to(tl.float32), DT).to(tl.float32)
    return tl.where(rotate, tl.reshape(tl.permute(tl.join(ra, rb), (1, 0)), (BLOCK_N,)), y)


@triton.jit
def gemv_kernel(x_ptr, res_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, N, K, stride_wn, eps,
                pos_ptr, cos_ptr, sin_ptr, stride_cache, rope_rows,
                PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN: tl.constexpr, PDL: tl.constexpr,
                ROPE: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid ``(cdiv(N, BLOCK_N),)``: ``out[n] = sum_k W[n, k] a[k] (+ b[n])`` for the program's
    ``BLOCK_N`` outputs, ``a`` = the prologue of x:

    - RMSNorm (``ADD_RMSNORM``: of ``residual + x``, rounded, which program 0 also writes to
      ``res_out``): ``a = norm_w * x`` and the row's ``rsqrt(mean(x^2) + eps)``
      is applied to the sum at the end, so the weight stream never waits on a reduction over x
      (unfused, the normed value and the product are each rounded to x's dtype first);
    - SiLU-and-mul of ``x = [gate | up]`` (``[2K]``), rounded where torch rounds.

    ``ROPE`` (a qkv projection, heads of ``2 * HALF`` rows): a program takes ``BLOCK_N / 2`` rows
    of one head and their rotation partners ``HALF`` further on, so the neox rotation of the
    first ``rope_rows`` outputs (q and k; v follows) by ``cos/sin[pos]`` happens in registers,
    with ``rotary_kernel``'s roundings, instead of in another launch.

    ``PDL`` (programmatic dependent launch, sm90+): the first weight tile is loaded before
    waiting for the previous kernel (whose output x is), and the next kernel may launch once
    every program has started, so one kernel's ramp-up overlaps the last one's tail; nothing
    is written before the wait. ``EVEN``: N and K are multiples of the blocks (no masks). No
    store sits in the weight loop (one there keeps the next tile's loads behind it), and
    program 0 writes the residual stream before its loop: after it, gate_up took 3 us longer."""
    pid = tl.program_id(0)
    DT: tl.constexpr = w_ptr.dtype.element_ty
    if ROPE:
        P: tl.constexpr = BLOCK_N // 2
        head = pid // (HALF // P)
        j0 = (pid % (HALF // P)) * P
        idx = tl.arange(0, BLOCK_N)
        cols = head * (2 * HALF) + j0 + idx % P + (idx // P) * HALF
    else:
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    ss = tl.zeros((BLOCK_K,), tl.float32)
    w_rows = w_ptr + cols[:, None].to(tl.int64) * stride_wn
    w = _gemv_w(w_rows, rk, rk < K, col_ok, EVEN)  # weights: no earlier kernel writes them
    if PDL:  # let the next kernel launch; wait for the previous one (x is its output)
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    if PROLOGUE == 2 and pid == 0:  # the residual stream residual + x (here, not after the loop: faster)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + rk
            k_ok = ks < K
            s = _gemv_vec(res_ptr, ks, k_ok, EVEN) + _gemv_vec(x_ptr, ks, k_ok, EVEN)
            tl.store(res_out_ptr + ks, _cast(s, DT), mask=k_ok)
    acc, ss = _gemv_step(acc, ss, w, x_ptr, res_ptr, nw_ptr, rk, rk < K, K, PROLOGUE, DT, EVEN)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        ks = k0 + rk
        k_ok = ks < K
        w = _gemv_w(w_rows, ks, k_ok, col_ok, EVEN)
        acc, ss = _gemv_step(acc, ss, w, x_ptr, res_ptr, nw_ptr, ks, k_ok, K, PROLOGUE, DT, EVEN)
    y = tl.sum(acc, axis=1)
    if PROLOGUE == 1 or PROLOGUE == 2:
        y = y * tl.math.rsqrt(tl.sum(ss, axis=0) / K + eps)
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    if ROPE:
        y = _rope_pairs(_cast(y, DT).to(tl.float32), pos_ptr, cos_ptr, sin_ptr, stride_cache, j0,
                        head * (2 * HALF) < rope_rows, DT, BLOCK_N)
    tl.store(out_ptr + cols, _cast(y, out_ptr.dtype.element_ty), mask=col_ok)
