"""Per-step input buffers, allocated once at their maximum size.

Host staging arrays are filled with numpy, then copied into device tensors whose
addresses never change (CUDA graphs replay on them). On the CPU the two are the same.
With ``persistent=False`` each step uploads fresh device tensors instead (XLA: an in-place
update of a device buffer would be traced into the step's graph).

Accelerators get two sets of host staging arrays, used by turns (``next_set``): a step's
uploads are asynchronous, so the next step - built before this one has run, under async
scheduling - must not write into the arrays they read. Two suffice while at most two steps
are unresolved (a step's uploads run before its sampled ids, which the host waits for).
"""
from __future__ import annotations

import numpy as np
import torch


class StepBuffers:
    def __init__(self, max_tokens: int, max_reqs: int, max_blocks_per_req: int,
                 device: torch.device, pin_memory: bool, persistent: bool = True) -> None:
        self.device, self.max_tokens = device, max_tokens
        self.same = device.type == "cpu"
        self.persistent = persistent
        specs = {
            "input_ids": ((max_tokens,), torch.int64),
            "positions": ((max_tokens,), torch.int64),
            "slot_mapping": ((max_tokens,), torch.int64),
            "query_start_loc": ((max_reqs + 1,), torch.int32),
            "seq_lens": ((max_reqs,), torch.int32),
            "block_table": ((max_reqs * max_blocks_per_req,), torch.int32),  # viewed [r, nb] per step
            "logits_indices": ((max_reqs,), torch.int64),
            "shared_prefix": ((1,), torch.int32),  # md.shared_prefix (cascade attention)
            # ids of the step in flight that this step reads: input_ids[dst] = sampled[src]
            "pending_dst": ((max_reqs,), torch.int64),
            "pending_src": ((max_reqs,), torch.int64),
        }
        self.dev: dict[str, torch.Tensor] = {}
        self._sets: list[tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]] = []
        for _ in range(1 if self.same or not persistent else 2):
            host = {name: torch.zeros(shape, dtype=dtype, pin_memory=pin_memory and not self.same)
                    for name, (shape, dtype) in specs.items()}
            self._sets.append((host, {name: t.numpy() for name, t in host.items()}))
        self._turn = 0
        self.host, self.np = self._sets[0]
        for name, (shape, dtype) in specs.items():
            if self.same or persistent:
                self.dev[name] = self.host[name] if self.same else torch.zeros(shape, dtype=dtype, device=device)

    def next_set(self) -> None:
        """Switch to the other set of host staging arrays (a no-op where there is one)."""
        self._turn = (self._turn + 1) % len(self._sets)
        self.host, self.np = self._sets[self._turn]

    def to_device(self, name: str, n: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Copy the first ``n`` entries to the device; return the device view (``shape``: reshaped
        on the host before a fresh upload, so XLA gets plain data rather than a view op)."""
        if not (self.same or self.persistent):
            host = self.host[name][:n]
            return (host if shape is None else host.view(shape)).to(self.device)
        dev = self.dev[name][:n]
        if not self.same:
            dev.copy_(self.host[name][:n], non_blocking=True)
        return dev if shape is None else dev.view(shape)
