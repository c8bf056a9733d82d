"""Hand-built attention metadata and a paged KV pool for model tests."""
from __future__ import annotations

import numpy as np
import torch

from attention.metadata import AttentionMetadata
from attention.torch_ref import TorchAttentionBackend


REF_BACKEND = TorchAttentionBackend


class BlockPool:
    """Blocks handed out in a shuffled order (block 0 is the null block, never given)."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        self.block_size = block_size
        self.free = list(np.random.default_rng(seed).permutation(np.arange(1, num_blocks)))
        self.tables: dict[int, list[int]] = {}

    def reserve(self, req: int, num_tokens: int) -> list[int]:
        table = self.tables.setdefault(req, [])
        while len(table) * self.block_size < num_tokens:
            table.append(int(self.free.pop()))
        return table


def kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
              dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Per layer ``[2, num_blocks, block_size, Hkv, D]``, filled with garbage that must never be read."""
    g = torch.Generator().manual_seed(7)
    return [torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype) * 100
            for _ in range(num_layers)]


def build_metadata(num_computed: list[int], num_new: list[int], tables: list[list[int]], block_size: int,
                   pad_tokens: int = 0, pad_reqs: int = 0) -> AttentionMetadata:
    """Request r has ``num_computed[r]`` tokens cached and ``num_new[r]`` scheduled now.
    Padding (tokens and request rows) follows the inert convention of AttentionMetadata."""
    n = len(num_new)
    q_lens = np.array(list(num_new) + [0] * pad_reqs, dtype=np.int32)
    seq_lens = np.array([c + q for c, q in zip(num_computed, num_new)] + [0] * pad_reqs, dtype=np.int32)
    qsl = np.zeros(n + pad_reqs + 1, dtype=np.int32)
    np.cumsum(q_lens, out=qsl[1:])
    width = max(len(t) for t in tables)
    table = np.zeros((n + pad_reqs, width), dtype=np.int32)
    for r, t in enumerate(tables):
        table[r, :len(t)] = t
    positions = np.concatenate([np.arange(c, c + q) for c, q in zip(num_computed, num_new)])
    reqs = np.repeat(np.arange(n), q_lens[:n])
    slots = table[reqs, positions // block_size].astype(np.int64) * block_size + positions % block_size
    slots = np.concatenate([slots, np.full(pad_tokens, -1, dtype=np.int64)])
    return AttentionMetadata(
        query_start_loc=torch.from_numpy(qsl), seq_lens=torch.from_numpy(seq_lens),
        block_table=torch.from_numpy(table), slot_mapping=torch.from_numpy(slots),
        max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens.max()),
        num_actual_tokens=int(qsl[n]), num_reqs=n, query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)


def positions_of(num_computed: list[int], num_new: list[int], pad_tokens: int = 0) -> torch.Tensor:
    pos = [torch.arange(c, c + q) for c, q in zip(num_computed, num_new)]
    return torch.cat(pos + [torch.zeros(pad_tokens, dtype=torch.int64)])


def prefill_metadata(lengths: list[int]) -> AttentionMetadata:
    """Every request starts at position 0 (for ``kv_caches=[None] * L``)."""
    return build_metadata([0] * len(lengths), lengths, [[0]] * len(lengths), block_size=1 << 20)
