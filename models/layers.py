"""Building blocks shardable by tensor-parallel rank: norms, activation, linear layers, embeddings.

Every parameter is created with ``torch.empty`` in the ambient default dtype/device (no init
cost, no second copy) and carries ``weight_loader(param, loaded_weight, shard_id=None)``, which
copies this rank's slice of the full HF tensor into it (casting on copy).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.fused_ops import fused_add_rmsnorm, fused_norm_supported, fused_ops_enabled, silu_and_mul


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tp_size={denominator}")
    return numerator // denominator


def _check_shape(loaded: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"expected shape {tuple(expected)}, found {tuple(loaded.shape)}")


def _new_param(*shape: int, loader: Callable[..., None], shard_ids: tuple[Any, ...] = ()) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    param.shard_ids = shard_ids  # type: ignore[attr-defined]  # HF tensors packed into this one
    return param


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """Replicated parameter: the full tensor, same shape."""
    _check_shape(loaded_weight, param.shape)
    param.data.copy_(loaded_weight)


def tp_all_reduce(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    if tp_size > 1:
        torch.distributed.all_reduce(x)
    return x


def tp_all_gather(x: torch.Tensor, tp_size: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dim."""
    if tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(tp_size)]
    torch.distributed.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


class RMSNorm(nn.Module):
    """HF's RMSNorm (float32 statistics). With ``residual``, first adds it in the activations'
    dtype (exactly HF's ``residual + h``) and returns ``(normed, new_residual)``. One fused
    kernel where ``models.fused_ops`` says so; the torch code below is the reference."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _new_param(hidden_size, loader=default_weight_loader)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if fused_ops_enabled(x) and fused_norm_supported(x, self.weight, residual):
            return fused_add_rmsnorm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = residual + x
        return self._norm(x), x


class SiluAndMul(nn.Module):
    """``[..., 2I] -> silu(first half) * second half``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops_enabled(x):
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's output rows split across ranks; the output stays sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_rank = _divide(output_size, tp_size, "output_size")
        self.weight = _new_param(self.output_size_per_rank, input_size, loader=self.weight_loader,
                                 shard_ids=self._shard_ids())
        self.bias = (_new_param(self.output_size_per_rank, loader=self.weight_loader, shard_ids=self._shard_ids())
                     if bias else None)

    def _shard_ids(self) -> tuple[Any, ...]:
        return ()

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        n = self.output_size_per_rank
        _check_shape(loaded_weight, (self.output_size, *param.shape[1:]))
        param.data.copy_(loaded_weight.narrow(0, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one GEMM (gate_up): each rank holds its slice of
    every part, packed in order; ``shard_id`` is the part's index."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        self.output_sizes = list(output_sizes)
        for i, size in enumerate(self.output_sizes):
            _divide(size, tp_size, f"output_sizes[{i}]")
        super().__init__(input_size, sum(self.output_sizes), bias, tp_rank, tp_size)

    def _shard_ids(self) -> tuple[Any, ...]:
        return tuple(range(len(self.output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id not in self._shard_ids():
            raise ValueError(f"shard_id must be one of {self._shard_ids()}, got {shard_id!r}")
        full = self.output_sizes[shard_id]
        n = full // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        _check_shape(loaded_weight, (full, *param.shape[1:]))
        param.data.narrow(0, offset, n).copy_(loaded_weight.narrow(0, self.tp_rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one GEMM, split by heads. With more ranks than KV heads,
    each KV head is replicated on ``tp_size // num_kv_heads`` consecutive ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_rank: int = 0, tp_size: int = 1) -> None:
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = _divide(num_heads, tp_size, "num_heads")
        if tp_size >= num_kv_heads:
            if tp_size % num_kv_heads:
                raise ValueError(f"tp_size={tp_size} is not a multiple of num_kv_heads={num_kv_heads}")
            self.num_kv_heads, self.kv_replicas = 1, tp_size // num_kv_heads
        else:
            self.num_kv_heads = _divide(num_kv_heads, tp_size, "num_kv_heads")
            self.kv_replicas = 1
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden_size, (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size,
                         bias, tp_rank, tp_size)

    def _shard_ids(self) -> tuple[Any, ...]:
        return ("q", "k", "v")

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id == "q":
            full, n, offset, head_rank = self.total_num_heads * self.head_dim, self.q_size, 0, self.tp_rank
        elif shard_id in ("k", "v"):
            full, n = self.total_num_kv_heads * self.head_dim, self.kv_size
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            head_rank = self.tp_rank // self.kv_replicas
        else:
            raise ValueError(f"shard_id must be one of ('q', 'k', 'v'), got {shard_id!r}")
        _check_shape(loaded_weight, (full, *param.shape[1:]))
        param.data.narrow(0, offset, n).copy_(loaded_weight.narrow(0, head_rank * n, n))


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's input columns split across ranks; the input arrives sharded
    and partial outputs are summed (all-reduce) before the bias is added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_rank = _divide(input_size, tp_size, "input_size")
        self.weight = _new_param(output_size, self.input_size_per_rank, loader=self.weight_loader)
        self.bias = _new_param(output_size, loader=default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        n = self.input_size_per_rank
        _check_shape(loaded_weight, (self.output_size, self.input_size))
        param.data.copy_(loaded_weight.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.linear(x, self.weight, self.bias)
        out = tp_all_reduce(F.linear(x, self.weight), self.tp_size)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks in contiguous ranges of ``ceil(vocab / tp_size)``;
    rows past the vocabulary on the last rank are zero padding."""

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.rows_per_rank = -(-vocab_size // tp_size)
        self.vocab_start = tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = _new_param(self.rows_per_rank, hidden_size, loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        _check_shape(loaded_weight, (self.vocab_size, self.hidden_size))
        n = max(self.vocab_end - self.vocab_start, 0)
        param.data[:n].copy_(loaded_weight[self.vocab_start:self.vocab_start + n])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = torch.where(outside, 0, input_ids - self.vocab_start)
        out = F.embedding(local, self.weight).masked_fill(outside[:, None], 0)
        return tp_all_reduce(out, self.tp_size)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, hidden] -> [R, vocab]`` against these rows (used when embeddings are tied)."""
        logits = tp_all_gather(F.linear(hidden, self.weight), self.tp_size)
        return logits[..., :self.vocab_size] if self.tp_size > 1 else logits


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded by vocabulary rows like the embedding."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.compute_logits(hidden)
