"""KV-cache spec, allocation and sizing (device-agnostic)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class KVCacheSpec:
    """Per layer, K and V are ``[num_blocks, block_size, num_kv_heads, head_dim]`` each,
    stored as one ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` tensor."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block costs across all layers, K and V."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    def allocate(self, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        if torch.device(device).type == "cpu":
            return [host_zeros(shape, self.dtype) for _ in range(self.num_layers)]
        return [torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(self.num_layers)]


def host_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed host tensor from calloc (through numpy): the OS maps zero pages lazily, so a large
    KV cache costs nothing until written (``torch.zeros`` writes every byte: ~1 s/GiB on 2 cores)."""
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = int(np.prod(shape, dtype=np.int64)) * elem
    raw = np.zeros(nbytes + 64, dtype=np.uint8)
    start = -raw.ctypes.data % 64  # cache-line aligned, as torch's allocator would give
    return torch.from_numpy(raw[start:start + nbytes]).view(dtype).view(shape)


def blocks_for_bytes(spec: KVCacheSpec, nbytes: int, *, max_model_len: int, max_useful: int | None,
                     budget_desc: str) -> int:
    """How many blocks ``nbytes`` holds; fail at start if one max_model_len request won't fit.

    ``max_useful`` caps the pool where more blocks can never be used (CPU RAM is shared).
    """
    per_req = -(-max_model_len // spec.block_size) + 1  # + the null block
    num = max(int(nbytes // spec.bytes_per_block), 0)
    if max_useful is not None:
        num = min(num, max_useful)
    if num < per_req:
        need = per_req * spec.bytes_per_block
        raise RuntimeError(
            f"the KV cache cannot hold one request of max_model_len={max_model_len}: {budget_desc} gives "
            f"{nbytes / 2**20:.1f} MiB = {num} blocks of {spec.bytes_per_block / 2**10:.1f} KiB, but "
            f"{per_req} blocks ({need / 2**20:.1f} MiB) are needed. Lower max_model_len, or raise "
            f"gpu_memory_utilization / kv_cache_memory_bytes / num_kv_blocks.")
    return num
