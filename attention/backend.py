"""The attention-backend contract."""
from __future__ import annotations

from typing import ClassVar

import torch

from attention.metadata import AttentionMetadata

FP8_KV = torch.float8_e4m3fn  # the fp8 KV-cache element (``kv_cache_dtype="fp8"``)
FP8_KV_MAX = float(torch.finfo(FP8_KV).max)  # K/V values past +-this saturate when stored


class AttentionBackend:
    """One instance per attention layer. ``forward`` writes the new K/V into the paged
    cache (by ``slot_mapping``) and returns attention over cached prefix + new tokens.

    KV cache per layer: ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V).
    ``kv_cache is None`` (profiling before the cache exists) means every request starts
    at position 0: attend causally over the new tokens only.
    """

    name: ClassVar[str]
    # forward of a prepared pure-decode step safe to capture in a graph and replay with other
    # lengths in the same tensors (runners capture only pure-decode steps)
    supports_graphs: ClassVar[bool] = False

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        if type(self).forward is AttentionBackend.forward and not self.splits_kv_write():
            raise TypeError(f"{type(self).__name__} implements neither forward nor write_kv and attend")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale

    @classmethod
    def unsupported_reason(cls, device_type: str, dtype: torch.dtype, head_dim: int,
                           block_size: int) -> str | None:
        """None if this backend runs here, else a sentence saying why not."""
        return None

    @classmethod
    def kv_cache_dtype_reason(cls, kv_dtype: torch.dtype, dtype: torch.dtype, device_type: str) -> str | None:
        """None if this backend writes and reads a KV cache of ``kv_dtype`` for a model computing
        in ``dtype`` on ``device_type``, else a sentence saying why not. By default only ``dtype``."""
        if kv_dtype == dtype:
            return None
        return f"{cls.name} keeps the KV cache in the model's dtype ({dtype}), not {kv_dtype}"

    @classmethod
    def prepare(cls, md: AttentionMetadata) -> AttentionMetadata:
        """Called once per step (not per layer): attach backend-specific data to ``md.extra``."""
        return md

    @classmethod
    def wants_shared_prefix(cls) -> bool:
        """Whether ``prepare`` reads ``md.shared_prefix_len`` (else the input builder leaves it 0,
        ``md.shared_prefix`` None, and spends no host time on them). Such a ``prepare`` decides a
        cascade (``md.cascade_prefix_len``) from host ints alone, and the cascade's kernels read
        the length from ``md.shared_prefix``: graph capture asks ``prepare`` about a dummy step
        that claims a whole shared prompt on the host and holds 0 on the device, and the graph
        captured from its answer serves every cascade step of that size."""
        return False

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        """q ``[T, Hq, D]``, k/v ``[T, Hkv, D]`` -> ``[T, Hq, D]``. The default writes the new
        K/V (``write_kv``) and attends (``attend``); a backend implements those two, or this."""
        if kv_cache is not None:
            self.write_kv(k, v, kv_cache, md.slot_mapping)
        return self.attend(q, k, v, kv_cache, md)

    # Optional halves of ``forward``, for backends that a composite (attention.composite) may
    # combine: it writes a step's K/V once, then lets each backend attend over part of the step.
    def write_kv(self, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        """Store k/v ``[T, Hkv, D]`` at ``slot_mapping``; slot -1 (padding) is never read back."""
        raise NotImplementedError(f"{type(self).__name__} does not split its KV write from attention")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        """``forward`` without the KV write: the new tokens' K/V are already in the cache."""
        raise NotImplementedError(f"{type(self).__name__} does not split its KV write from attention")

    @classmethod
    def splits_kv_write(cls) -> bool:
        """Whether ``write_kv`` and ``attend`` are implemented."""
        return cls.attend is not AttentionBackend.attend and cls.write_kv is not AttentionBackend.write_kv

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        return self.forward(q, k, v, kv_cache, md)
