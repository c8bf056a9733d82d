"""Build paged mixed batches (with padding) and a naive dense attention reference for tests."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attention.metadata import AttentionMetadata
from attention.torch_ref import TorchAttentionBackend


@dataclass
class Batch:
    q: torch.Tensor  # [T_pad, Hq, D]
    k: torch.Tensor  # [T_pad, Hkv, D]
    v: torch.Tensor
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, Hkv, D]; prefix filled, rest as given
    md: AttentionMetadata
    written: torch.Tensor  # bool [num_blocks, block_size]: slots the new tokens write


def make_batch(q_lens: list[int], ctx_lens: list[int], *, num_heads: int = 8, num_kv_heads: int = 2,
               head_dim: int = 64, block_size: int = 16, pad_reqs: int = 0, pad_tokens: int = 0,
               dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
               poison: float | None = None, spare_blocks: int = 2) -> Batch:
    """Requests with ``ctx_lens`` cached tokens and ``q_lens`` new ones, blocks shuffled.

    ``poison`` fills every cache slot that no request may read (unused blocks, the tail of
    last blocks, the null block 0) with that value, e.g. NaN.
    """
    g = torch.Generator().manual_seed(seed)
    seq = [q + c for q, c in zip(q_lens, ctx_lens)]
    per_req = [-(-s // block_size) for s in seq]
    num_blocks = 1 + sum(per_req) + spare_blocks
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    num_reqs = len(q_lens)
    table = torch.zeros(num_reqs + pad_reqs, max(per_req + [1]), dtype=torch.int32)
    readable = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    written = torch.zeros_like(readable)
    slots: list[int] = []
    for r, n in enumerate(per_req):
        table[r, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]
        pos = torch.arange(seq[r])
        blk, off = table[r, pos // block_size].long(), pos % block_size
        readable[blk, off] = True
        written[blk[ctx_lens[r]:], off[ctx_lens[r]:]] = True
        slots += (blk * block_size + off)[ctx_lens[r]:].tolist()
    num_tokens = sum(q_lens)
    slots += [-1] * pad_tokens
    qsl = np.concatenate([[0], np.cumsum(q_lens), [num_tokens] * pad_reqs]).astype(np.int32)
    lens = np.array(seq + [0] * pad_reqs, dtype=np.int32)
    md = AttentionMetadata(
        query_start_loc=torch.from_numpy(qsl).to(device), seq_lens=torch.from_numpy(lens).to(device),
        block_table=table.to(device), slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(q_lens), max_seq_len=max(seq), num_actual_tokens=num_tokens,
        num_reqs=num_reqs, query_start_loc_cpu=qsl, seq_lens_cpu=lens)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    if poison is not None:
        cache[:, ~readable] = poison
    total = num_tokens + pad_tokens
    q, k, v = (torch.randn(total, h, head_dim, generator=g)
               for h in (num_heads, num_kv_heads, num_kv_heads))
    return Batch(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
                 cache.to(device, dtype), md, written.to(device))


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                    md: AttentionMetadata, scale: float) -> torch.Tensor:
    """Naive float64 attention: per request, gather exactly positions ``< seq_len`` (new K/V
    placed at their slots first), full softmax per token over its visible keys. Padding rows 0."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    qsl, lens = md.query_start_loc_cpu, md.seq_lens_cpu
    groups = q.shape[1] // k.shape[1]
    for r in range(md.num_reqs):
        s, e = int(qsl[r]), int(qsl[r + 1])
        q_len, seq_len = e - s, int(lens[r]) if kv_cache is not None else e - s
        if kv_cache is None:
            keys, vals = k[s:e].cpu().double(), v[s:e].cpu().double()
        else:
            bs = kv_cache.shape[2]
            pos = torch.arange(seq_len)
            blk = md.block_table[r].cpu()[pos // bs].long()
            keys = kv_cache[0].cpu()[blk, pos % bs].double()
            vals = kv_cache[1].cpu()[blk, pos % bs].double()
            keys[seq_len - q_len:] = k[s:e].cpu().double()  # the new tokens' own K/V
            vals[seq_len - q_len:] = v[s:e].cpu().double()
        keys = keys.repeat_interleave(groups, dim=1)  # [L, Hq, D]
        vals = vals.repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,lhd->hql", q[s:e].cpu().double(), keys) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len)
        visible = torch.arange(seq_len)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[s:e] = torch.einsum("hql,lhd->qhd", scores.softmax(-1), vals)
    return out


def torch_reference_backend(num_heads: int, num_kv_heads: int, head_dim: int,
                            scale: float) -> TorchAttentionBackend:
    return TorchAttentionBackend(num_heads, num_kv_heads, head_dim, scale)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
