"""flash-attn backend: flash-attn-4 (``flash_attn.cute``, paged through ``page_table`` and
``seqused_k``) or, when that is the package installed, FA2's ``flash_attn_varlen_func`` with
``block_table``. Imports are lazy: nothing from flash_attn loads until the backend is chosen.

Both read the KV cache halves ``kv_cache[0]``/``kv_cache[1]`` as ``[num_pages, page_size,
Hkv, D]`` directly. Length bounds passed to them are graph-stable: ``max_seqlen_q`` is the
step's host value (1 for captured decode batches) and the K bound is the block table's width.
"""
from __future__ import annotations

import functools

import torch

from attention.backend import AttentionBackend
from attention.metadata import AttentionMetadata
from platforms.triton_support import compute_capability

_HALF = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def flash_flavour() -> tuple[str | None, str]:
    """("fa4" | "fa2" | None, why neither imports)."""
    try:
        from flash_attn.cute import flash_attn_varlen_func  # noqa: F401
        return "fa4", ""
    except Exception as e:  # a broken CUDA/cutlass install raises more than ImportError
        fa4_err = f"{type(e).__name__}: {e}"
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401,F811
        return "fa2", ""
    except Exception as e:
        return None, (f"flash-attn is not importable (flash_attn.cute: {fa4_err}; "
                      f"flash_attn: {type(e).__name__}: {e})")


def _head_dim_reason(flavour: str, cc: int | None, head_dim: int) -> str | None:
    if head_dim % 8:
        return f"head_dim={head_dim} must be a multiple of 8"
    if flavour == "fa4" and cc is not None and cc // 10 in (10, 11):
        if head_dim > 128 and head_dim != 256:
            return f"flash-attn-4 on sm_{cc} supports head_dim <= 128 or 256, got {head_dim}"
    elif head_dim > 256:
        return f"head_dim={head_dim} is above 256"
    return None


def _padding_rows_to_zero(out: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
    """Rows past the last request's tokens are not written by flash-attn: make them 0."""
    pad = torch.arange(out.shape[0], device=out.device) >= md.query_start_loc[-1]
    return out.masked_fill_(pad[:, None, None], 0)


class FlashAttentionBackend(AttentionBackend):
    """flash-attn-4 or FA2 for attention; the KV write is the Triton kernel (torch fallback)."""

    name = "flash"
    supports_graphs = True

    @classmethod
    def unsupported_reason(cls, device_type: str, dtype: torch.dtype, head_dim: int,
                           block_size: int) -> str | None:
        flavour, why = flash_flavour()
        if flavour is None:
            return why
        if device_type != "cuda":
            return f"flash-attn needs a cuda device, got {device_type!r}"
        if dtype not in _HALF:
            return f"flash-attn supports float16/bfloat16, got {dtype}"
        cc = compute_capability()
        if flavour == "fa4" and cc is not None and cc // 10 not in (9, 10, 11):
            return (f"flash-attn-4 paged attention needs compute capability 9.x-11.x, "
                    f"got {cc / 10:.1f}")
        if flavour == "fa2":
            if cc is not None and cc < 80:
                return f"flash-attn 2 needs compute capability >= 8.0, got {cc / 10:.1f}"
            if block_size % 256:
                return f"flash-attn 2 paged KV needs block_size divisible by 256, got {block_size}"
        return _head_dim_reason(flavour, cc, head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        if q.shape[0] == 0 or md.max_query_len == 0:
            return torch.zeros_like(q)
        return super().forward(q, k, v, kv_cache, md)

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        _write_kv(k, v, kv_cache, slot_mapping)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        if q.shape[0] == 0 or md.max_query_len == 0:
            return torch.zeros_like(q)
        run = self._fa4 if flash_flavour()[0] == "fa4" else self._fa2
        return _padding_rows_to_zero(run(q, k, v, kv_cache, md), md)

    def _fa4(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        from flash_attn.cute import flash_attn_varlen_func
        if kv_cache is None:  # profiling: causal over the new tokens only
            res = flash_attn_varlen_func(
                q, k, v, cu_seqlens_q=md.query_start_loc, cu_seqlens_k=md.query_start_loc,
                max_seqlen_q=md.max_query_len, max_seqlen_k=md.max_query_len,
                softmax_scale=self.scale, causal=True)
        else:
            res = flash_attn_varlen_func(
                q, kv_cache[0], kv_cache[1], cu_seqlens_q=md.query_start_loc,
                max_seqlen_q=md.max_query_len, seqused_k=md.seq_lens, page_table=md.block_table,
                softmax_scale=self.scale, causal=True)
        return res[0] if isinstance(res, tuple) else res

    def _fa2(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func
        if kv_cache is None:
            return flash_attn_varlen_func(q, k, v, md.query_start_loc, md.query_start_loc,
                                          md.max_query_len, md.max_query_len,
                                          softmax_scale=self.scale, causal=True)
        cu_k = torch.nn.functional.pad(md.seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
        max_k = md.block_table.shape[1] * kv_cache.shape[2]
        return flash_attn_varlen_func(q, kv_cache[0], kv_cache[1], md.query_start_loc, cu_k,
                                      md.max_query_len, max_k, softmax_scale=self.scale,
                                      causal=True, block_table=md.block_table)


def _write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    from attention.triton_attn import triton_import_error, write_kv_cache_triton
    if triton_import_error() is None:
        write_kv_cache_triton(k, v, kv_cache, slot_mapping)
    else:
        from attention.torch_ref import write_kv_cache
        write_kv_cache(k, v, kv_cache, slot_mapping)
