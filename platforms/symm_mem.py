"""Small all-reduces through PyTorch symmetric memory (CUDA peers over NVLink/P2P).

``OneShotAllReduce`` (env ``RUNNERS_SYMM_MEM_MAX_BYTES``, see ``CudaPlatform.small_all_reduce``):
one Triton kernel per all-reduce that pushes this rank's tensor into every peer's buffer and
sums what the peers pushed into its own, with no barrier (``platforms.one_shot_kernels``).
NVLink multicast (``multimem``) is never used. The buffers have fixed addresses, so it works
inside CUDA graphs.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


class OneShotAllReduce:
    """Sums contiguous tensors of ``dtype`` up to ``max_bytes`` over the group in one launch.

    ``peer_buffers``: the address of every rank's buffer (rank order) of ``2 x world x max_elems``
    elements, each filled with ``-0.0`` before any rank's first call; ``keep`` holds whatever
    owns them. ``from_group`` allocates them in symmetric memory; tests pass host buffers."""

    BLOCK = 1024  # elements per program; fixed, since each program counts its own calls
    DTYPES = (torch.bfloat16, torch.float16, torch.float32)

    def __init__(self, rank: int, peer_buffers: Sequence[int], device: torch.device, dtype: torch.dtype,
                 max_bytes: int, keep: Any = None) -> None:
        from platforms.one_shot_kernels import one_shot_all_reduce_kernel
        from platforms.triton_support import launch_pdl

        if dtype not in self.DTYPES:
            raise ValueError(f"one-shot all-reduce sums bfloat16, float16 or float32, not {dtype}")
        self.rank, self.world = rank, len(peer_buffers)
        self.dtype, self.max_bytes, self.device, self.keep = dtype, max_bytes, device, keep
        self.max_elems = self.slot_elems(dtype, max_bytes)
        self.peers = torch.tensor(list(peer_buffers), dtype=torch.int64, device=device)
        self.counters = torch.zeros(self.max_elems // self.BLOCK, dtype=torch.int32, device=device)
        pdl = launch_pdl(device)  # resolved once: every call is on this device
        self._launch = dict(RANK=rank, WORLD=self.world, BLOCK=self.BLOCK, PDL=pdl, num_warps=4,
                            SENTINEL=-(1 << (8 * dtype.itemsize - 1)),  # -0.0's bits as a signed integer
                            **({"launch_pdl": True} if pdl else {}))
        self._kernel = one_shot_all_reduce_kernel

    @classmethod
    def slot_elems(cls, dtype: torch.dtype, max_bytes: int) -> int:
        """Elements of one rank's slot in one region: ``max_bytes`` rounded up to whole programs."""
        return -(-max_bytes // dtype.itemsize // cls.BLOCK) * cls.BLOCK

    @classmethod
    def buffer_elems(cls, world: int, dtype: torch.dtype, max_bytes: int) -> int:
        """Elements of each rank's buffer: 2 regions x ``world`` slots."""
        return 2 * world * cls.slot_elems(dtype, max_bytes)

    @classmethod
    def from_group(cls, group: Any, device: torch.device, dtype: torch.dtype, max_bytes: int) -> "OneShotAllReduce":
        """Collective: every rank of ``group`` calls it. Raises if the installed torch or the
        devices cannot share memory (the caller then keeps NCCL)."""
        import torch.distributed._symmetric_memory as symm_mem

        world = torch.distributed.get_world_size(group)
        buf = symm_mem.empty(cls.buffer_elems(world, dtype, max_bytes), dtype=dtype, device=device)
        buf.fill_(-0.0)
        handle = symm_mem.rendezvous(buf, (group or torch.distributed.group.WORLD).group_name)
        if handle is None:
            raise RuntimeError("symmetric-memory rendezvous returned no handle")
        torch.accelerator.synchronize(device)
        torch.distributed.barrier(group)  # every buffer holds the sentinel before anyone pushes
        return cls(handle.rank, list(handle.buffer_ptrs), device, dtype, max_bytes, keep=(buf, handle))

    def accepts(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.numel() <= self.max_elems and x.is_contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        if n:  # (no programs, no counts: the ranks stay in step)
            self._kernel[(-(-n // self.BLOCK),)](x, x, self.peers, self.counters, n, self.max_elems, **self._launch)
        return x
