"""``TokenwiseSplit``: a model's forward as token-wise pieces with attention between them.

A model that offers ``tokenwise_split()`` can run as piecewise graphs: every piece treats each
token on its own (norms, projections, rotary, MLP, all-reduces), so it can be compiled once for
any token count and captured as a graph per count; attention, which mixes tokens through the
KV cache and the per-step metadata, runs eagerly between pieces. The contract, for L layers::

    q, k, v, res = entry(input_ids, positions)
    for i in range(L):
        o = attention[i](q, k, v, kv_caches[i], md)
        if i < L - 1:
            q, k, v, res = between[i](o, res, positions)
    (hidden,) = exit(o, res)        # == model(input_ids, positions, kv_caches, md)

Pieces return tuples of tensors; ``between`` pieces are instances of one class, so
torch.compile compiles their code once for all layers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn


@dataclass
class TokenwiseSplit:
    entry: nn.Module
    between: list[nn.Module]
    exit: nn.Module
    attention: list[Callable]

    def __post_init__(self) -> None:
        if len(self.between) != len(self.attention) - 1:
            raise ValueError(f"a split of {len(self.attention)} attention layers needs "
                             f"{len(self.attention) - 1} between-pieces, got {len(self.between)}")
