"""Reference attention in plain torch: paged KV, variable-length queries, GQA, any device."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from attention.backend import FP8_KV, FP8_KV_MAX, AttentionBackend
from attention.metadata import AttentionMetadata


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store k/v ``[T, Hkv, D]`` at ``slot_mapping`` (block * block_size + offset).

    Padding slots (-1) are redirected to slot 0 of the null block, which no request ever
    reads: that keeps the write free of host syncs and shape changes (graph-safe).
    """
    num_tokens = slot_mapping.shape[0]
    flat = _bytes(kv_cache).view(2, -1, kv_cache.shape[-2], kv_cache.shape[-1])
    slots = slot_mapping.clamp_min(0)
    flat[0].index_copy_(0, slots, _bytes(to_cache_dtype(k[:num_tokens], kv_cache.dtype)))
    flat[1].index_copy_(0, slots, _bytes(to_cache_dtype(v[:num_tokens], kv_cache.dtype)))


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """fp8 as uint8 (same bits), for the indexing ops torch lacks for fp8 on some devices."""
    return x.view(torch.uint8) if x.dtype == FP8_KV else x


def to_cache_dtype(x: torch.Tensor, kv_dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the cache stores it: fp8 saturates at +-448 (a plain cast would give NaN)."""
    if kv_dtype == FP8_KV:
        x = x.clamp(-FP8_KV_MAX, FP8_KV_MAX)
    return x.to(kv_dtype)


def gather_kv(kv_cache: torch.Tensor, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``block_ids [..., nb]`` -> K and V ``[..., nb * block_size, Hkv, D]``."""
    if kv_cache.dtype == FP8_KV:  # (a dtype view, even to the same type, would leave XLA's graph)
        k, v = (_bytes(kv_cache[i])[block_ids].view(FP8_KV) for i in (0, 1))
    else:
        k, v = kv_cache[0][block_ids], kv_cache[1][block_ids]
    shape = (*block_ids.shape[:-1], -1, kv_cache.shape[-2], kv_cache.shape[-1])
    return k.reshape(shape), v.reshape(shape)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
          scale: float) -> torch.Tensor:
    """q ``[B, Q, Hq, D]``, k/v ``[B, L, Hkv, D]``, mask ``[B, Q, L]`` (True = attend)."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype),
        attn_mask=mask.unsqueeze(1), scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class TorchAttentionBackend(AttentionBackend):
    """Exact and simple; decodes are batched into one call, prefill chunks go one by one."""

    name = "torch"

    @classmethod
    def kv_cache_dtype_reason(cls, kv_dtype: torch.dtype, dtype: torch.dtype, device_type: str) -> str | None:
        if kv_dtype in (dtype, FP8_KV):
            return None
        return f"torch attention keeps K/V in {dtype} or {FP8_KV}, not {kv_dtype}"

    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        write_kv_cache(k, v, kv_cache, slot_mapping)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        out = torch.zeros_like(q)
        qsl, lens = md.query_start_loc_cpu, md.seq_lens_cpu
        q_lens = qsl[1:md.num_reqs + 1] - qsl[:md.num_reqs]
        decodes = [r for r in range(md.num_reqs) if q_lens[r] == 1]
        if kv_cache is not None and len(decodes) > 1:
            self._decode_batch(q, kv_cache, md, decodes, out)
            decodes = set(decodes)
        else:
            decodes = set()
        for r in range(md.num_reqs):
            if r in decodes or q_lens[r] == 0:
                continue
            s, e, seq_len = int(qsl[r]), int(qsl[r + 1]), int(lens[r])
            if kv_cache is None:
                if seq_len != e - s:
                    raise ValueError("attention without a KV cache needs num_computed_tokens == 0")
                keys, vals = k[s:e], v[s:e]
            else:
                nb = -(-seq_len // kv_cache.shape[2])
                keys, vals = gather_kv(kv_cache, md.block_table[r, :nb])
                keys, vals = keys[:seq_len], vals[:seq_len]
                if kv_cache.dtype != k.dtype and e - s >= 2:  # prefill rows attend to their new K/V as
                    ctx = seq_len - (e - s)                   # computed, not as stored (as Triton's do)
                    keys = torch.cat((keys[:ctx].to(k.dtype), k[s:e]))
                    vals = torch.cat((vals[:ctx].to(v.dtype), v[s:e]))
            q_pos = torch.arange(seq_len - (e - s), seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
            out[s:e] = _sdpa(q[None, s:e], keys[None], vals[None], mask[None], self.scale)[0]
        return out

    def _decode_batch(self, q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata,
                      rows: list[int], out: torch.Tensor) -> None:
        block_size = kv_cache.shape[2]
        lens_cpu = md.seq_lens_cpu[rows]
        nb = -(-int(lens_cpu.max()) // block_size)
        rows_t = torch.as_tensor(rows, device=q.device)
        keys, vals = gather_kv(kv_cache, md.block_table[rows_t, :nb])
        tok = md.query_start_loc[rows_t].long()
        lens = md.seq_lens[rows_t]
        mask = torch.arange(nb * block_size, device=q.device)[None, :] < lens[:, None]
        out[tok] = _sdpa(q[tok][:, None], keys, vals, mask[:, None], self.scale)[:, 0]
