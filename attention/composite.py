"""Per-step kernel choice: a decode kernel and a prefill kernel behind the one metadata contract.

``prepare`` (once per step, host ints only) picks the step's route from the measured crossovers
(``attention.crossovers``): the whole step on the decode kernel, the whole step on the prefill
kernel, or a split - decode rows (query length 1) to the decode kernel and prefill rows to the
prefill kernel. Both read the one paged KV cache layout; in a split the composite writes the
step's K/V once (the decode backend's ``write_kv``) and each backend only ``attend``s.

Rows are in batch order (cached requests, then new ones), so the decode rows need not be
contiguous: each group gets its own metadata, with row and token indices uploaded once per step
(pinned, non-blocking) - or plain slices when the group's rows are contiguous, the usual case.
Pure-decode steps (the ones runners capture as graphs) always take the decode route on the
step's own metadata tensors, so ``supports_graphs`` is the decode backend's.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from attention.backend import AttentionBackend
from attention.crossovers import (Crossover, Route, StepShape, choose_route, crossover_for,
                                  family_key)
from attention.flash_attn import FlashAttentionBackend
from attention.metadata import AttentionMetadata, dummy_prefill
from attention.triton_attn import TritonAttentionBackend

Index = slice | torch.Tensor


@dataclass
class Group:
    """One kernel's share of a split step: its token rows in the step and its own metadata."""

    tokens: Index
    md: AttentionMetadata


@dataclass
class StepPlan:
    route: Route
    whole: AttentionMetadata | None = None  # decode/prefill routes: the step's md, prepared
    decode: Group | None = None  # split route
    prefill: Group | None = None
    num_actual_tokens: int = 0


def _upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """One host-to-device copy (pinned, non-blocking) of several int arrays, as int64 views."""
    flat = torch.from_numpy(np.concatenate(arrays).astype(np.int64))
    if device.type != "cpu":
        flat = flat.pin_memory().to(device, non_blocking=True)
    return list(torch.split(flat, [len(a) for a in arrays]))


@dataclass
class _Rows:
    """One group's rows on the host: slices when contiguous, else index arrays to upload."""

    rows_cpu: np.ndarray
    qsl: np.ndarray  # the group's own query_start_loc
    rows: slice | None = None
    tokens: slice | None = None
    indices: tuple[np.ndarray, np.ndarray] | None = None  # (rows, tokens) when not contiguous


def _rows(md: AttentionMetadata, rows: np.ndarray, q_lens: np.ndarray) -> _Rows:
    lens = q_lens[rows]
    qsl = np.zeros(len(rows) + 1, np.int32)
    np.cumsum(lens, out=qsl[1:])
    if rows[-1] - rows[0] + 1 == len(rows):  # contiguous rows own contiguous tokens
        first = int(md.query_start_loc_cpu[rows[0]])
        return _Rows(rows, qsl, slice(int(rows[0]), int(rows[-1]) + 1), slice(first, first + int(qsl[-1])))
    starts = md.query_start_loc_cpu[rows].astype(np.int64)
    return _Rows(rows, qsl, indices=(rows, np.repeat(starts - qsl[:-1], lens) + np.arange(int(qsl[-1]))))


def _sub_metadata(md: AttentionMetadata, g: _Rows, rows: Index, tokens: Index,
                  qsl_dev: torch.Tensor) -> AttentionMetadata:
    seq_lens_cpu = md.seq_lens_cpu[g.rows_cpu]
    return AttentionMetadata(
        query_start_loc=qsl_dev, seq_lens=md.seq_lens[rows], block_table=md.block_table[rows],
        slot_mapping=md.slot_mapping[tokens], max_query_len=int(np.diff(g.qsl).max()),
        max_seq_len=int(seq_lens_cpu.max()), num_actual_tokens=int(g.qsl[-1]), num_reqs=len(g.rows_cpu),
        query_start_loc_cpu=g.qsl, seq_lens_cpu=seq_lens_cpu)


class CompositeAttentionBackend(AttentionBackend):
    """A decode backend and a prefill backend per layer, routed per step (module docstring).

    Subclasses set ``decode_cls`` and ``prefill_cls`` (both must implement ``write_kv`` and
    ``attend``); ``composite_backend`` makes one. ``crossover`` fixes the thresholds (None:
    the table's entry for the device), ``route_override`` forces a route (tests, benchmarks;
    a split with one group empty runs that group's kernel alone).
    """

    decode_cls: ClassVar[type[AttentionBackend]]
    prefill_cls: ClassVar[type[AttentionBackend]]
    crossover: ClassVar[Crossover | None] = None
    route_override: ClassVar[Route | None] = None

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if hasattr(cls, "decode_cls"):
            cls.supports_graphs = cls.decode_cls.supports_graphs  # graphs are pure-decode steps

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        self.decode_attn = self.decode_cls(num_heads, num_kv_heads, head_dim, scale)
        self.prefill_attn = self.prefill_cls(num_heads, num_kv_heads, head_dim, scale)
        self._prefill_warm = False

    @classmethod
    def unsupported_reason(cls, device_type: str, dtype: torch.dtype, head_dim: int,
                           block_size: int) -> str | None:
        for role, sub in (("decode", cls.decode_cls), ("prefill", cls.prefill_cls)):
            reason = sub.unsupported_reason(device_type, dtype, head_dim, block_size)
            if reason:
                return f"its {role} backend {sub.name!r} cannot run: {reason}"
            if not sub.splits_kv_write():
                return f"its {role} backend {sub.name!r} does not implement write_kv/attend"
        return None

    @classmethod
    def kv_cache_dtype_reason(cls, kv_dtype: torch.dtype, dtype: torch.dtype, device_type: str) -> str | None:
        for role, sub in (("decode", cls.decode_cls), ("prefill", cls.prefill_cls)):  # both read one cache
            reason = sub.kv_cache_dtype_reason(kv_dtype, dtype, device_type)
            if reason:
                return f"its {role} backend {sub.name!r}: {reason}"
        return None

    @classmethod
    def crossover_here(cls, device: torch.device) -> Crossover:
        return cls.crossover or crossover_for(family_key(device), cls.decode_cls.name, cls.prefill_cls.name)

    @classmethod
    def step_shape(cls, md: AttentionMetadata) -> tuple[StepShape, np.ndarray]:
        q_lens = np.diff(md.query_start_loc_cpu[:md.num_reqs + 1])
        pre = q_lens >= 2
        return StepShape(int((q_lens == 1).sum()), int(q_lens[pre].sum()), int(pre.sum())), q_lens

    @classmethod
    def wants_shared_prefix(cls) -> bool:
        return cls.decode_cls.wants_shared_prefix()  # pure-decode steps take the decode route

    @classmethod
    def prepare(cls, md: AttentionMetadata) -> AttentionMetadata:
        shape, q_lens = cls.step_shape(md)
        route = cls.route_override or choose_route(shape, cls.crossover_here(md.seq_lens.device))
        if route == "split" and not (shape.decode_tokens and shape.prefill_tokens):
            route = "prefill" if shape.prefill_tokens else "decode"
        if route != "split":
            sub = cls.decode_cls if route == "decode" else cls.prefill_cls
            whole = sub.prepare(dataclasses.replace(md, extra=None))
            return dataclasses.replace(md, extra=StepPlan(route, whole=whole),
                                       cascade_prefix_len=whole.cascade_prefix_len)
        host = [_rows(md, np.flatnonzero(q_lens == 1), q_lens), _rows(md, np.flatnonzero(q_lens >= 2), q_lens)]
        uploaded = iter(_upload([a for g in host for a in (g.qsl, *(g.indices or ()))], md.seq_lens.device))
        groups = []
        for g, sub_cls in zip(host, (cls.decode_cls, cls.prefill_cls)):
            qsl_dev = next(uploaded).to(torch.int32)
            rows, tokens = (g.rows, g.tokens) if g.indices is None else (next(uploaded), next(uploaded))
            groups.append(Group(tokens, sub_cls.prepare(_sub_metadata(md, g, rows, tokens, qsl_dev))))
        return dataclasses.replace(md, extra=StepPlan("split", decode=groups[0], prefill=groups[1],
                                                      num_actual_tokens=md.num_actual_tokens))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        plan = md.extra
        if not isinstance(plan, StepPlan):  # metadata not prepared for this backend (per call: slow)
            plan = type(self).prepare(md).extra
        if kv_cache is not None and not self._prefill_warm:
            self._warm_up_prefill(q, kv_cache)
        if plan.route == "decode":
            return self.decode_attn(q, k, v, kv_cache, plan.whole)
        if plan.route == "prefill":
            return self.prefill_attn(q, k, v, kv_cache, plan.whole)
        if kv_cache is not None:
            self.decode_attn.write_kv(k, v, kv_cache, md.slot_mapping)  # once, for both groups
        out = torch.empty_like(q)
        for attn, g in ((self.decode_attn, plan.decode), (self.prefill_attn, plan.prefill)):
            out[g.tokens] = attn.attend(q[g.tokens], k[g.tokens], v[g.tokens], kv_cache, g.md)
        out[plan.num_actual_tokens:] = 0  # padding rows, as every backend leaves them
        return out

    def _warm_up_prefill(self, q: torch.Tensor, kv_cache: torch.Tensor) -> None:
        """Run the prefill kernel once on a dummy 128-token request over the null block (output
        dropped) at the first forward with a cache - a warm-up or graph-capture dummy step: a
        kernel compiled on first use (flash-attn-4 JIT-compiles its paged variant) would
        otherwise stall the first real step routed to it, which may come long after start-up."""
        self._prefill_warm = True
        n = 128
        kv = q.new_zeros(n, self.num_kv_heads, self.head_dim)
        self.prefill_attn.attend(q.new_zeros(n, self.num_heads, self.head_dim), kv, kv, kv_cache,
                                 self.prefill_cls.prepare(dummy_prefill(n, kv_cache.shape[2], q.device)))


def composite_backend(decode: type[AttentionBackend], prefill: type[AttentionBackend],
                      name: str | None = None) -> type[CompositeAttentionBackend]:
    """A composite of two backend classes (e.g. for tests: Triton decode + torch prefill)."""
    return type(f"Composite_{decode.name}_{prefill.name}", (CompositeAttentionBackend,),
                {"name": name or f"{decode.name}+{prefill.name}", "decode_cls": decode,
                 "prefill_cls": prefill})


class AutoAttentionBackend(CompositeAttentionBackend):
    """The CUDA default when both import: Triton split-KV for decode rows, flash-attn for
    prefill rows, each step routed by the GPU family's crossovers."""

    name = "auto"
    decode_cls = TritonAttentionBackend
    prefill_cls = FlashAttentionBackend
