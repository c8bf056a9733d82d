"""Piecewise graphs: the model's token-wise pieces compiled with torch.compile, attention eager.

``PiecewiseModel`` runs a model's ``TokenwiseSplit`` (models/split.py). Every piece is wrapped
so that it writes its outputs into fixed boundary buffers (``max_tokens`` rows each: q, k, v,
two residuals by turns, the attention output, the final hidden states); a step of ``T`` tokens
uses their first ``T`` rows. Fixed addresses let ``capture`` record each piece as a graph per
token count, which ``forward`` replays when a step's (padded) token count has one; any other
count runs the compiled pieces directly. Attention runs eagerly between pieces on the step's
metadata, so one captured piece serves prefill chunks, decodes and mixed steps alike.

The pieces are compiled once per piece class (all ``between`` pieces share one code), with the
token dimension dynamic; torch.compile's on-disk caches (``TORCHINDUCTOR_CACHE_DIR``) make a
second start reuse the compiled kernels.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from attention import AttentionMetadata
from models.split import TokenwiseSplit

RECOMPILE_LIMIT = 64  # graphs per piece class: (dynamic T, T == 1) x model families in one process


class _IntoBuffers(nn.Module):
    """Runs a piece and copies its outputs into ``outs`` (compiled, the copies fuse into it)."""

    def __init__(self, piece: nn.Module) -> None:
        super().__init__()
        self.piece = piece

    def forward(self, outs: tuple[torch.Tensor, ...], *args: torch.Tensor) -> None:
        for buf, x in zip(outs, self.piece(*args)):
            buf.copy_(x)


def _raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo_config

    for key in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, key):
            setattr(dynamo_config, key, max(getattr(dynamo_config, key), RECOMPILE_LIMIT))


class PiecewiseModel:
    def __init__(self, split: TokenwiseSplit, max_tokens: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        _raise_recompile_limit()
        self.split, self.num_layers = split, len(split.attention)
        a = split.attention[0]

        def buf(*shape: int) -> torch.Tensor:
            return torch.zeros((max_tokens, *shape), dtype=dtype, device=device)

        self.q, self.attn = buf(a.num_heads, a.head_dim), buf(a.num_heads * a.head_dim)
        self.k, self.v = buf(a.num_kv_heads, a.head_dim), buf(a.num_kv_heads, a.head_dim)
        self.res, self.hidden = (buf(hidden_size), buf(hidden_size)), buf(hidden_size)
        pieces = [split.entry, *split.between, split.exit]
        self.pieces: list[Callable[..., None]] = [torch.compile(_IntoBuffers(p)) for p in pieces]
        self.graphs: dict[tuple[int, int], Any] = {}  # (piece index, tokens) -> captured graph
        self._marked = [False] * len(pieces)

    def _io(self, i: int, t: int, input_ids: torch.Tensor, positions: torch.Tensor
            ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Piece i's output buffers and inputs at ``t`` tokens (residuals alternate by layer)."""
        qkv = (self.q[:t], self.k[:t], self.v[:t])
        if i == 0:
            return (*qkv, self.res[0][:t]), (input_ids, positions)
        if i < self.num_layers:
            return (*qkv, self.res[i % 2][:t]), (self.attn[:t], self.res[(i - 1) % 2][:t], positions)
        return (self.hidden[:t],), (self.attn[:t], self.res[(i - 1) % 2][:t])

    def _run(self, i: int, outs: tuple[torch.Tensor, ...], args: tuple[torch.Tensor, ...]) -> None:
        graph = self.graphs.get((i, outs[0].shape[0]))
        if graph is not None:
            graph.replay()
            return
        if not self._marked[i] and outs[0].shape[0] > 1:  # compile for any token count from here on
            for x in (*outs, *args):
                torch._dynamo.mark_dynamic(x, 0)
            self._marked[i] = True
        self.pieces[i](outs, *args)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor | None], md: AttentionMetadata) -> torch.Tensor:
        """Same contract as the model's forward; padded tokens (beyond ``md.num_actual_tokens``)
        give rows that nothing reads."""
        t = input_ids.shape[0]
        for i in range(self.num_layers + 1):
            self._run(i, *self._io(i, t, input_ids, positions))
            if i < self.num_layers:
                out = self.split.attention[i](self.q[:t], self.k[:t], self.v[:t], kv_caches[i], md)
                self.attn[:t].copy_(out.reshape(t, -1))
        return self.hidden[:t]

    def capture(self, sizes: list[int], input_ids: torch.Tensor, positions: torch.Tensor,
                platform: Any, pool: Any) -> None:
        """Capture every piece at each token count in ``sizes`` (largest first), on the first
        rows of the fixed buffers and of ``input_ids``/``positions`` (the step buffers)."""
        for t in sorted(sizes, reverse=True):
            for i in range(self.num_layers + 1):
                outs, args = self._io(i, t, input_ids[:t], positions[:t])
                for _ in range(2):  # warm-up: compiles, autotunes, settles allocations
                    self._run(i, outs, args)
                graph = platform.new_graph()
                with platform.graph_capture(graph, pool):
                    self.pieces[i](outs, *args)
                self.graphs[(i, t)] = graph
