"""Fused elementwise ops of the decoder (Triton): residual add + RMSNorm, SiLU-and-mul, RoPE on q
and k in one launch. Each returns what the torch path in ``models.layers``/``models.rotary``
returns, rounded at the same places (see ``models.fused_kernels``).

Dispatch: ``fused_ops_enabled(x)`` decides per call from the mode, which is ``auto`` (fused on
CUDA/XPU tensors when triton imports, torch elsewhere), ``on`` (always fused; CPU tensors
need ``TRITON_INTERPRET=1``) or ``off``; it starts from env ``RUNNERS_FUSED_OPS`` and
``fused_ops_mode(mode)`` changes it for a ``with`` block (tests, A/B timings).

The wrappers are graph-safe: no host syncs, launch grids from shapes only; position values
are not range-checked (that would read the device), they must lie in ``[0, max_position)``.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator, NamedTuple

import torch

from platforms.triton_support import launch_pdl

ENV_VAR = "RUNNERS_FUSED_OPS"
MODES = ("auto", "on", "off")
MAX_NORM_BLOCK = 32768  # the whole row in registers; wider rows take the torch path
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LAUNCH = dict(enable_fp_fusion=False)  # no FMA contraction: round each product as torch does


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"fused ops mode must be one of {MODES}, got {mode!r}")
    return mode


_mode = _check_mode(os.environ.get(ENV_VAR, "auto"))


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def fused_ops_enabled(x: torch.Tensor) -> bool:
    """Whether ops on ``x`` take the fused path under the current mode (float64 never does).
    Never while torch.compile traces: its own code generator fuses these ops."""
    if _mode == "off" or x.dtype not in _DTYPES or torch.compiler.is_compiling():
        return False
    device = x.device.type
    if _mode == "auto":
        return device in ("cuda", "xpu") and _triton_importable()
    if not _triton_importable():
        raise RuntimeError(f"{ENV_VAR}=on needs the triton package, which is not installed: CUDA/ROCm/XPU "
                           f"builds of torch bring it; otherwise pip install triton (or set {ENV_VAR}=auto)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(f"{ENV_VAR}=on with a cpu tensor needs TRITON_INTERPRET=1")
    if device not in ("cuda", "xpu", "cpu"):
        raise RuntimeError(f"{ENV_VAR}=on: no fused kernels for device {device!r} (cuda, xpu)")
    return True


def get_fused_ops_mode() -> str:
    """The current mode: auto, on or off."""
    return _mode


@contextlib.contextmanager
def fused_ops_mode(mode: str) -> Iterator[None]:
    """Run a block under ``mode`` (auto/on/off), restoring the previous mode after."""
    global _mode
    previous, _mode = _mode, _check_mode(mode)
    try:
        yield
    finally:
        _mode = previous


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} dtype must be one of {_DTYPES}, got {t.dtype}")


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[A, B, N]`` with a unit last stride (a view whenever strides allow)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x[None, None]
    if x.dim() == 2:
        return x[:, None]
    return x.reshape(-1, x.shape[-2], x.shape[-1])


def fused_norm_supported(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> bool:
    """What ``fused_add_rmsnorm`` takes: supported dtypes, a residual like ``x``, rows that fit
    one block. Anything else stays on the torch path."""
    return (x.dtype in _DTYPES and weight.dtype in _DTYPES and _pow2(x.shape[-1]) <= MAX_NORM_BLOCK
            and tuple(weight.shape) == (x.shape[-1],)
            and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape)))


def fused_add_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of ``x`` (any leading dims and strides, e.g. the per-head
    q/k views of Qwen3). With ``residual`` (same shape and dtype): ``x = residual + x`` first,
    returning ``(normed, x)``, as ``RMSNorm.forward`` does. ``normed`` has dtype
    ``promote(weight, x)``; outputs are new contiguous tensors."""
    from models.fused_kernels import add_rmsnorm_kernel
    n = x.shape[-1]
    _check_dtype("x", x)
    _check_dtype("weight", weight)
    if tuple(weight.shape) != (n,):
        raise ValueError(f"weight must have shape ({n},), got {tuple(weight.shape)}")
    if _pow2(n) > MAX_NORM_BLOCK:
        raise ValueError(f"rows of {n} elements exceed the fused norm's block ({MAX_NORM_BLOCK})")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}), "
                         f"got ({tuple(residual.shape)}, {residual.dtype})")
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    x3 = _rows_view(x)
    r3 = _rows_view(residual) if residual is not None else x3
    n_rows = x3.shape[0] * x3.shape[1]
    if n_rows:
        block = _pow2(n)
        rows = max(1, min(2048 // block, _pow2(n_rows), 16))  # small rows (head_dim): several per program
        warps = max(1, min(16, rows * block // 512))  # 8 warps for 4096, 16 from 8192
        add_rmsnorm_kernel[(_cdiv(n_rows, rows),)](
            x3, r3, weight.contiguous(), out, res_out if res_out is not None else out,
            n_rows, n, x3.shape[1], x3.stride(0), x3.stride(1), r3.stride(0), r3.stride(1), float(eps),
            HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK_N=block, num_warps=warps, **_LAUNCH)
    return out if res_out is None else (out, res_out)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[..., 2I] -> silu(x[..., :I]) * x[..., I:]`` in one pass (a new contiguous tensor)."""
    from models.fused_kernels import silu_and_mul_kernel
    _check_dtype("x", x)
    two_i = x.shape[-1]
    if two_i % 2:
        raise ValueError(f"silu_and_mul needs an even last dim, got {two_i}")
    inter = two_i // 2
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, two_i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] and inter:
        block = min(1024, _pow2(inter))
        silu_and_mul_kernel[(x2.shape[0], _cdiv(inter, block))](
            x2, out, inter, x2.stride(0), inter, BLOCK=block, num_warps=max(1, min(4, block // 256)), **_LAUNCH)
    return out


def _heads_view(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 3:
        raise ValueError(f"{name} must be [tokens, heads, head_dim], got shape {tuple(t.shape)}")
    return t if t.stride(-1) == 1 else t.contiguous()


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox (rotate-half) RoPE on ``q [T, Hq, D]`` and ``k [T, Hk, D]`` (strided views are fine)
    in one launch, cos/sin rows ``[max_pos, D/2]`` looked up by ``positions [T]`` in-kernel.
    ``inplace`` writes into q and k (returning them); else new contiguous tensors."""
    from models.fused_kernels import rotary_kernel
    q, k = _heads_view("q", q), _heads_view("k", k)
    _check_dtype("q", q)
    t, hq, d = q.shape
    if k.shape[0] != t or k.shape[2] != d or k.dtype != q.dtype:
        raise ValueError(f"k must be [{t}, heads, {d}] of {q.dtype}, got {tuple(k.shape)} of {k.dtype}")
    if d % 2 or tuple(cos_cache.shape[1:]) != (d // 2,) or sin_cache.shape != cos_cache.shape:
        raise ValueError(f"cos/sin caches must be [max_pos, {d // 2}] for an even head_dim {d}, "
                         f"got {tuple(cos_cache.shape)} and {tuple(sin_cache.shape)}")
    if tuple(positions.shape) != (t,):
        raise ValueError(f"positions must have shape ({t},), got {tuple(positions.shape)}")
    positions, cos_cache, sin_cache = positions.contiguous(), cos_cache.contiguous(), sin_cache.contiguous()
    qo, ko = (q, k) if inplace else (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                                     torch.empty(k.shape, dtype=k.dtype, device=k.device))
    if t:
        hk = k.shape[1]
        rotary_kernel[(t,)](q, k, qo, ko, positions, cos_cache, sin_cache,
                            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                            qo.stride(0), qo.stride(1), ko.stride(0), ko.stride(1), cos_cache.stride(0),
                            NUM_Q_HEADS=hq, NUM_K_HEADS=hk, HALF=d // 2, HQ_PAD=_pow2(hq), HK_PAD=_pow2(hk),
                            HALF_PAD=_pow2(d // 2), num_warps=4 if (hq + hk) * d >= 2048 else 2, **_LAUNCH)
    return qo, ko


# -- GEMV: one row times a large weight at memory speed, the op before it fused in front --
_GEMV_DTYPES = (torch.bfloat16, torch.float16)
GEMV_PLAIN, GEMV_RMSNORM, GEMV_ADD_RMSNORM, GEMV_SILU_MUL = 0, 1, 2, 3  # gemv_kernel's PROLOGUE


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int


class GemvRope(NamedTuple):
    """Neox RoPE for a qkv GEMV to apply to its first ``rows`` outputs (q and k heads of
    ``head_dim``) at ``positions [1]``, from ``cos/sin_cache [max_pos, head_dim/2]`` (float32 as
    ``RotaryEmbedding`` keeps them; values are cast to the activations' dtype, as HF does)."""

    positions: torch.Tensor
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor
    head_dim: int
    rows: int


def gemv_config(n: int, k: int) -> GemvConfig:
    """The launch for an ``[n, k]`` weight, from ``benchmarks/gpu_gemv.py --search`` on an H200
    with Llama-3-8B's projections: 8 output rows a program over 1024-wide K-blocks (o_proj,
    gate_up, down: even 4096 outputs make 512 programs); 16 rows over 512 for a qkv-shaped
    weight (grouped KV heads: between 1x and 2x as many outputs as inputs); the LM head's
    128k rows 4 a program over 2048-wide blocks with 8 warps."""
    if n > 32768:
        return GemvConfig(4, 2048, 1, 8)
    if k < n < 2 * k:
        return GemvConfig(16, 512, 1, 4)
    return GemvConfig(8, 1024, 1, 4)


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """What the GEMV kernels take: ``x [1, K]`` with a unit last stride and a 16-bit ``weight
    [N, K]`` of x's dtype with a unit last stride."""
    return (x.dim() == 2 and weight.dim() == 2 and x.shape[0] == 1 and x.dtype in _GEMV_DTYPES
            and weight.dtype == x.dtype and x.stride(-1) == 1 and weight.stride(-1) == 1)


def _check_rope(rope: GemvRope, n: int) -> None:
    d = rope.head_dim
    if d < 2 or d % 2 or n % d or rope.rows % d or not 0 <= rope.rows <= n:
        raise ValueError(f"GEMV RoPE needs an even head_dim dividing N={n} and rows={rope.rows} (<= N), "
                         f"got head_dim {d}")
    if tuple(rope.positions.shape) != (1,):
        raise ValueError(f"GEMV RoPE takes one position, got positions of shape {tuple(rope.positions.shape)}")
    for name, c in (("cos", rope.cos_cache), ("sin", rope.sin_cache)):
        if c.dim() != 2 or c.shape[1] != d // 2 or c.dtype not in _DTYPES or c.stride(1) != 1:
            raise ValueError(f"{name}_cache must be [max_pos, {d // 2}] of float32/bfloat16/float16 with a unit "
                             f"last stride, got {tuple(c.shape)} of {c.dtype}")
    if rope.sin_cache.stride(0) != rope.cos_cache.stride(0):
        raise ValueError("cos_cache and sin_cache must have the same row stride")


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prologue: int, k: int,
          residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
          config: GemvConfig | None = None, rope: GemvRope | None = None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    from models.fused_kernels import gemv_kernel
    if not gemv_supported(x[:, :k], weight) or weight.shape[1] != k:
        raise ValueError(f"GEMV takes x [1, K] and weight [N, K] of one 16-bit dtype with unit last strides, got "
                         f"x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    n = weight.shape[0]
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be ({n},) of {weight.dtype}, got {tuple(bias.shape)} of {bias.dtype}")
    cfg = config or gemv_config(n, k)
    half = 1
    if rope is not None:
        _check_rope(rope, n)
        half = rope.head_dim // 2
        while half % (cfg.block_n // 2):  # a program's rows and their partners lie in one head
            cfg = cfg._replace(block_n=cfg.block_n // 2)
    pdl = launch_pdl(x.device)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty((1, k), dtype=x.dtype, device=x.device) if residual is not None else None
    pos, cos, sin = (rope.positions, rope.cos_cache, rope.sin_cache) if rope is not None else (x, x, x)
    gemv_kernel[(_cdiv(n, cfg.block_n),)](
        x, residual if residual is not None else x, norm_weight if norm_weight is not None else weight,
        weight, bias if bias is not None else weight, out, res_out if res_out is not None else out,
        n, k, weight.stride(0), float(eps), pos, cos, sin, cos.stride(0), rope.rows if rope is not None else 0,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, EVEN=n % cfg.block_n == 0 and k % cfg.block_k == 0,
        PDL=pdl, ROPE=rope is not None, HALF=half, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_stages=cfg.num_stages, num_warps=cfg.num_warps,
        **({"launch_pdl": True} if pdl else {}), **_LAUNCH)  # an option only CUDA's backend knows
    return out, res_out


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [1, K]`` (see ``gemv_supported``), one launch."""
    return _gemv(x, weight, bias, GEMV_PLAIN, x.shape[-1], config=config)[0]


def rmsnorm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                 config: GemvConfig | None = None, rope: GemvRope | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.linear(RMSNorm(x), weight, bias)`` for ``x [1, K]`` in one launch. Returns ``(y,
    residual stream)``: with ``residual``, ``x = residual + x`` first (rounded, exactly as
    ``fused_add_rmsnorm``) and that sum is returned; without it, ``x`` itself. The norm's scale
    is applied to the accumulated sum, not rounded per element: ``y`` agrees with the unfused
    ops to bf16/fp16 rounding, not bit for bit. ``rope``: the first ``rope.rows`` outputs (a qkv
    projection's q and k) leave rotated, exactly as ``rotary`` would rotate ``y``."""
    k = x.shape[-1]
    if tuple(norm_weight.shape) != (k,) or norm_weight.dtype != x.dtype:
        raise ValueError(f"norm weight must be ({k},) of {x.dtype}, got {tuple(norm_weight.shape)} of {norm_weight.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(-1) != 1):
        raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}), got ({tuple(residual.shape)}, "
                         f"{residual.dtype})")
    y, res_out = _gemv(x, weight, bias, GEMV_RMSNORM if residual is None else GEMV_ADD_RMSNORM, k, residual,
                       norm_weight.contiguous(), eps, config, rope)
    return y, res_out if res_out is not None else x


def silu_mul_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: GemvConfig | None = None) -> torch.Tensor:
    """``F.linear(silu(x[:, :I]) * x[:, I:], weight, bias)`` for ``x [1, 2I]``, one launch."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"silu_mul_gemv needs x [1, 2I], got {tuple(x.shape)}")
    return _gemv(x, weight, bias, GEMV_SILU_MUL, x.shape[1] // 2, config=config)[0]
