"""``GraphManager``: the one object that owns how a step's forward runs - full graph, piecewise
(compiled pieces, captured per token count where the platform has graphs) or eager - and the
graphs it captured. The base's ``_forward`` goes through ``forward``; the ``DevicePlan`` decides.

Fixed-address buffers it relies on (graphs replay on them): the runner's step input buffers
(``StepBuffers``, persistent: input_ids, positions, slot_mapping, query_start_loc, seq_lens,
block_table, logits_indices), the KV caches (allocated once, before capture) and, piecewise,
``PiecewiseModel``'s boundary buffers. Full decode graphs are keyed by padded batch size,
piecewise graphs by (piece, padded token count); ``DevicePlan.shape`` pads steps to those sizes.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from platforms import Platform
from runners.inputs import StepInputs
from runners.piecewise import PiecewiseModel
from runners.plan import DevicePlan
from runners.step_buffers import StepBuffers


class GraphManager:
    def __init__(self, plan: DevicePlan, platform: Platform, buffers: StepBuffers, hidden_size: int,
                 dtype: torch.dtype) -> None:
        self.plan, self.platform, self.buffers = plan, platform, buffers
        self._piece_args = (buffers.max_tokens, hidden_size, dtype, buffers.device)
        self.full: dict[int, Callable[[], torch.Tensor]] = {}  # decode batch size -> replay
        self.cascade: dict[int, Callable[[], torch.Tensor]] = {}  # the same, for cascade steps
        self.piecewise: PiecewiseModel | None = None

    @property
    def num_graphs(self) -> int:
        return len(self.full) + len(self.cascade) + (len(self.piecewise.graphs) if self.piecewise is not None else 0)

    def forward(self, model: torch.nn.Module, step: StepInputs, kv_caches: list[torch.Tensor | None]) -> torch.Tensor:
        """Hidden states of ``step``: a full graph for a captured pure-decode size (a cascade
        step: the cascade graph of its size), else the piecewise model where the plan says so,
        else the eager model."""
        if step.md.is_pure_decode and self.full:
            replay = (self.cascade if step.md.cascade_prefix_len else self.full).get(step.input_ids.shape[0])
            if replay is not None:
                return replay()
        if step.mm_embeds is not None:  # image embeddings replace placeholder tokens' (eager)
            return model(step.input_ids, step.positions, kv_caches, step.md, step.mm_embeds)
        if self.plan.use_piecewise_graph:
            return self._pieces(model).forward(step.input_ids, step.positions, kv_caches, step.md)
        return model(step.input_ids, step.positions, kv_caches, step.md)

    def _pieces(self, model: torch.nn.Module) -> PiecewiseModel:
        if self.piecewise is None:  # built at the first step (the profile run counts its buffers)
            split = getattr(model, "tokenwise_split", None)
            if split is None:
                raise ValueError(f"use_piecewise_graph=True, but {type(model).__name__} has no tokenwise_split(): "
                                 f"run it with use_piecewise_graph=False")
            self.piecewise = PiecewiseModel(split(), *self._piece_args)
        return self.piecewise

    @torch.inference_mode()
    def capture(self, model: torch.nn.Module, kv_caches: list[torch.Tensor],
                dummy: Callable[..., StepInputs | None], warm_up: Callable[[int, int], Any]) -> None:
        """Capture what the plan asks for: full decode graphs at ``decode_graph_sizes`` (largest
        first, one memory pool; beside each, a cascade graph where the attention backend takes
        cascades at that size), then the pieces at ``tokenwise_graph_batch_sizes``. ``dummy(t, r)``
        builds inert inputs of t tokens over r requests in the step buffers (``cascade=True``: as
        a cascade step, or None); ``warm_up(t, r)`` runs such a step (compiles kernels, settles
        allocations)."""
        platform, pool = self.platform, None
        if self.plan.has_graphs:
            pool = platform.graph_pool_handle()
        for n in sorted(self.plan.decode_graph_sizes, reverse=True):
            warm_up(n, n)
            warm_up(n, n)
            step = dummy(n, n)
            self.full[n] = _capture(model, step, kv_caches, platform, pool)
            step = dummy(n, n, cascade=True)
            if step is not None:
                if not self.cascade:  # the first compiles the cascade kernels (no size changes them)
                    model(step.input_ids, step.positions, kv_caches, step.md)
                self.cascade[n] = _capture(model, step, kv_caches, platform, pool)
        sizes = self.plan.tokenwise_graph_batch_sizes
        if sizes:  # the pieces read input_ids/positions from the step buffers
            self._pieces(model).capture(list(sizes), self.buffers.dev["input_ids"], self.buffers.dev["positions"],
                                        platform, pool)
        if self.plan.has_graphs:
            platform.synchronize()


def _capture(model: torch.nn.Module, step: StepInputs, kv_caches: list[torch.Tensor], platform: Platform,
             pool: Any) -> "_Replay":
    graph = platform.new_graph()
    with platform.graph_capture(graph, pool):
        out = model(step.input_ids, step.positions, kv_caches, step.md)
    return _Replay(graph, out)


class _Replay:
    def __init__(self, graph: Any, out: torch.Tensor) -> None:
        self.graph, self.out = graph, out

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.out
