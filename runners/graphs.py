"""Graph capture of pure-decode steps at padded batch sizes (CUDA and XPU graphs).

Each graph replays the model forward on the runner's persistent step buffers; the
base's ``_forward`` picks it by padded (tokens, requests) shape.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from runners.base import ModelRunnerBase
    from runners.inputs import StepInputs


def default_graph_sizes(max_size: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 256, then every 16 (vLLM-like), capped at max_size."""
    sizes = [1, 2, 4] + list(range(8, 257, 8)) + list(range(272, 1025, 16))
    return [s for s in sizes if s < max_size] + [max_size]


def plan_decode_graphs(runner: "ModelRunnerBase") -> None:
    """Choose the decode batch sizes to capture (``runner.graph_sizes``) and pad pure-decode steps
    to them (``runner.decode_buckets``), when graphs can run: not ``enforce_eager``, a platform
    with graphs and a graph-safe attention backend."""
    runner.graph_sizes = []
    if runner.config.enforce_eager or not runner.platform.supports_graphs \
            or not runner.attn_backend.supports_graphs:
        return
    limit = min(runner.max_num_reqs, runner.max_num_tokens)
    sizes = runner.config.cuda_graph_sizes or default_graph_sizes(limit)
    runner.graph_sizes = sorted(s for s in sizes if s <= limit)
    runner.decode_buckets = runner.graph_sizes or None


def _replay(graph: Any, out: torch.Tensor, step: "StepInputs") -> torch.Tensor:
    graph.replay()
    return out


@torch.inference_mode()
def capture_decode_graphs(runner: "ModelRunnerBase", sizes: list[int]) -> None:
    """Capture one graph per size into ``runner.captured``, largest first (sharing a pool)."""
    platform = runner.platform
    pool = platform.graph_pool_handle()
    for n in sorted(sizes, reverse=True):
        runner._dummy_run(n, n)  # warm-up: compiles kernels, settles allocations
        runner._dummy_run(n, n)
        step = runner.inputs.dummy(n, n)
        graph = platform.new_graph()
        with platform.graph_capture(graph, pool):
            out = runner.model(step.input_ids, step.positions, runner.kv_caches, step.md)
        runner.captured[(n, n)] = functools.partial(_replay, graph, out)
    platform.synchronize()
