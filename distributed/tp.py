"""``TPGroup``: rank, size and the two collectives tensor parallelism needs.

The all-reduce goes through one function: a platform-supplied fast path for small messages
(``SmallAllReduce``, e.g. PyTorch symmetric memory over NVLink on CUDA) when it accepts the
tensor, else ``torch.distributed.all_reduce`` on the group (NCCL, gloo, ...). Every rank gets
bit-identical results from both, which keeps sampling identical across ranks.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class SmallAllReduce(Protocol):
    """A faster all-reduce for some tensors (small ones, one dtype): ``accepts`` says which."""

    def accepts(self, x: torch.Tensor) -> bool: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class TPGroup:
    """This process's place in a tensor-parallel group. ``group`` is a torch.distributed process
    group (None: the default group); a group of size 1 never communicates."""

    def __init__(self, rank: int = 0, size: int = 1, group: Any = None) -> None:
        if not (isinstance(size, int) and size >= 1 and isinstance(rank, int) and 0 <= rank < size):
            raise ValueError(f"tensor-parallel rank must be in [0, size) with size >= 1, got rank={rank}, size={size}")
        self.rank, self.size, self.group = rank, size, group
        self.small_all_reduce: SmallAllReduce | None = None

    @classmethod
    def single(cls) -> "TPGroup":
        return cls(0, 1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the group (may reuse ``x``'s storage; use the return value)."""
        if self.size == 1:
            return x
        return self._all_reduce(x)

    @torch.compiler.disable  # torch.compile'd pieces (piecewise graphs) call it eagerly
    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.small_all_reduce
        if fast is not None and fast.accepts(x):
            return fast(x)
        torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` concatenated along the last dimension, in rank order."""
        if self.size == 1:
            return x
        return self._all_gather(x)

    @torch.compiler.disable
    def _all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
        gather(out, x, group=self.group)  # rank-major along dim 0
        out = out.view(self.size, *x.shape).movedim(0, -2)
        return out.reshape(*x.shape[:-1], self.size * x.shape[-1])

    def describe_all_reduce(self, backend: str) -> str:
        """E.g. "nccl" or "OneShotAllReduce up to 8 MiB, then nccl"."""
        fast = self.small_all_reduce
        limit = getattr(fast, "max_bytes", None)
        if fast is None:
            return backend
        return f"{type(fast).__name__}" + (f" up to {limit / 2**20:g} MiB" if limit else "") + f", then {backend}"

    def __repr__(self) -> str:
        fast = type(self.small_all_reduce).__name__ if self.small_all_reduce is not None else None
        return f"TPGroup(rank={self.rank}, size={self.size}, small_all_reduce={fast})"
