"""Building blocks shardable by tensor-parallel rank: norms, activation, linear layers, embeddings.

Every parameter is created with ``torch.empty`` in the ambient default dtype/device (no init
cost, no second copy) and carries ``weight_loader(param, loaded_weight, shard_id=None)``, which
copies this rank's slice of the full HF tensor into it (casting on copy). ``loaded_weight`` is
a tensor or a lazy safetensors slice (``get_shape()``, ``[a:b]``): with a slice only this rank's
rows or columns are read from the file. Sharded layers take a ``distributed.TPGroup`` (its
rank, size and collectives); the default is one rank.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distributed import TPGroup
from models.fused_ops import (GemvRope, fused_add_rmsnorm, fused_norm_supported, fused_ops_enabled, gemv,
                              gemv_supported, rmsnorm_gemv, silu_and_mul, silu_mul_gemv)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}")
    return numerator // denominator


def _shape(loaded: Any) -> tuple[int, ...]:
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def _check_shape(loaded: Any, expected: Sequence[int]) -> None:
    if _shape(loaded) != tuple(expected):
        raise ValueError(f"expected shape {tuple(expected)}, found {_shape(loaded)}")


def _rows(loaded: Any, start: int, n: int) -> torch.Tensor:
    """Rows [start, start + n) of a tensor or safetensors slice (reads only those)."""
    return loaded.narrow(0, start, n) if isinstance(loaded, torch.Tensor) else loaded[start:start + n]


def _cols(loaded: Any, start: int, n: int) -> torch.Tensor:
    return loaded.narrow(1, start, n) if isinstance(loaded, torch.Tensor) else loaded[:, start:start + n]


def _whole(loaded: Any) -> torch.Tensor:
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def _new_param(*shape: int, loader: Callable[..., None], shard_ids: tuple[Any, ...] = ()) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    param.shard_ids = shard_ids  # type: ignore[attr-defined]  # HF tensors packed into this one
    return param


def default_weight_loader(param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
    """Replicated parameter: the full tensor, same shape."""
    _check_shape(loaded_weight, param.shape)
    param.data.copy_(_whole(loaded_weight))


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


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` takes the GEMV kernels: the fused path and one row (decode at
    batch 1, where each projection streams its weight once and the launches around it count)."""
    return fused_ops_enabled(x) and gemv_supported(x, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, or one GEMV kernel for one row on the fused path."""
    return gemv(x, weight, bias) if _takes_gemv(x, weight) else F.linear(x, weight, bias)


def takes_norm_gemv(norm: RMSNorm, proj: ColumnParallelLinear, x: torch.Tensor,
                    residual: torch.Tensor | None = None) -> bool:
    """Whether ``rmsnorm_and_project`` runs as one GEMV kernel for these inputs."""
    return (_takes_gemv(x, proj.weight) and norm.weight.dtype == x.dtype
            and (residual is None or (residual.shape == x.shape and residual.dtype == x.dtype)))


def rmsnorm_and_project(norm: RMSNorm, proj: ColumnParallelLinear, x: torch.Tensor,
                        residual: torch.Tensor | None = None, rope: GemvRope | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``proj(norm(x))`` on HF's residual stream: returns ``(projection, residual)``, the residual
    being ``x`` itself without ``residual``, else ``residual + x``. One kernel on the GEMV path
    (``takes_norm_gemv``), which alone takes ``rope`` (the projection's q/k rows leave rotated)."""
    if takes_norm_gemv(norm, proj, x, residual):
        return rmsnorm_gemv(x, norm.weight, norm.eps, proj.weight, proj.bias, residual, rope=rope)
    if rope is not None:
        raise ValueError("rope is applied in the projection only on the GEMV path (see takes_norm_gemv)")
    if residual is None:
        return proj(norm(x)), x
    h, residual = norm(x, residual)
    return proj(h), residual


class SiluAndMul(nn.Module):
    """``[..., 2I] -> silu(first half) * second half``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ops_enabled(x):
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's output rows split across ranks; the output stays sharded."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp or TPGroup.single()
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_rank = _divide(output_size, self.tp.size, "output_size")
        self.weight = _new_param(self.output_size_per_rank, input_size, loader=self.weight_loader,
                                 shard_ids=self._shard_ids())
        self.bias = (_new_param(self.output_size_per_rank, loader=self.weight_loader, shard_ids=self._shard_ids())
                     if bias else None)

    def _shard_ids(self) -> tuple[Any, ...]:
        return ()

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        n = self.output_size_per_rank
        _check_shape(loaded_weight, (self.output_size, *param.shape[1:]))
        param.data.copy_(_rows(loaded_weight, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one GEMM (gate_up): each rank holds its slice of
    every part, packed in order; ``shard_id`` is the part's index."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 tp: TPGroup | None = None) -> None:
        self.output_sizes = list(output_sizes)
        for i, size in enumerate(self.output_sizes):
            _divide(size, (tp or TPGroup.single()).size, f"output_sizes[{i}]")
        super().__init__(input_size, sum(self.output_sizes), bias, tp)

    def _shard_ids(self) -> tuple[Any, ...]:
        return tuple(range(len(self.output_sizes)))

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        if shard_id not in self._shard_ids():
            raise ValueError(f"shard_id must be one of {self._shard_ids()}, got {shard_id!r}")
        full = self.output_sizes[shard_id]
        n = full // self.tp.size
        offset = sum(self.output_sizes[:shard_id]) // self.tp.size
        _check_shape(loaded_weight, (full, *param.shape[1:]))
        param.data.narrow(0, offset, n).copy_(_rows(loaded_weight, self.tp.rank * n, n))


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one GEMM, split by heads. With more ranks than KV heads,
    each KV head is replicated on ``tp_size // num_kv_heads`` consecutive ranks."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp: TPGroup | None = None) -> None:
        tp = tp or TPGroup.single()
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = _divide(num_heads, tp.size, "num_attention_heads")
        if num_kv_heads % tp.size and tp.size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size={tp.size} neither divides num_key_value_heads={num_kv_heads} "
                             "nor is a multiple of it")
        self.num_kv_heads = max(num_kv_heads // tp.size, 1)
        self.kv_replicas = max(tp.size // num_kv_heads, 1)
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        super().__init__(hidden_size, (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size, bias, tp)

    def _shard_ids(self) -> tuple[Any, ...]:
        return ("q", "k", "v")

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        if shard_id == "q":
            full, n, offset, head_rank = self.total_num_heads * self.head_dim, self.q_size, 0, self.tp.rank
        elif shard_id in ("k", "v"):
            full, n = self.total_num_kv_heads * self.head_dim, self.kv_size
            offset = self.q_size + (self.kv_size if shard_id == "v" else 0)
            head_rank = self.tp.rank // self.kv_replicas
        else:
            raise ValueError(f"shard_id must be one of ('q', 'k', 'v'), got {shard_id!r}")
        _check_shape(loaded_weight, (full, *param.shape[1:]))
        param.data.narrow(0, offset, n).copy_(_rows(loaded_weight, head_rank * n, n))


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's input columns split across ranks; the input arrives sharded
    and partial outputs are summed (all-reduce) before the bias is added once."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp or TPGroup.single()
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_rank = _divide(input_size, self.tp.size, "input_size")
        self.weight = _new_param(output_size, self.input_size_per_rank, loader=self.weight_loader)
        self.bias = _new_param(output_size, loader=default_weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        n = self.input_size_per_rank
        _check_shape(loaded_weight, (self.output_size, self.input_size))
        param.data.copy_(_cols(loaded_weight, self.tp.rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._reduce(linear(x, self.weight, self.bias if self.tp.size == 1 else None))

    def forward_silu_mul(self, gate_up: torch.Tensor, act: SiluAndMul) -> torch.Tensor:
        """``forward(act(gate_up))`` for ``gate_up [T, 2I]``: one kernel on the GEMV path."""
        if gate_up.dim() != 2 or not _takes_gemv(gate_up[:, :self.input_size_per_rank], self.weight):
            return self(act(gate_up))
        return self._reduce(silu_mul_gemv(gate_up, self.weight, self.bias if self.tp.size == 1 else None))

    def _reduce(self, out: torch.Tensor) -> torch.Tensor:
        """This rank's partial product -> the full output (the bias is added once, after the sum)."""
        if self.tp.size == 1:
            return out
        out = self.tp.all_reduce(out)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split across ranks in contiguous ranges of ``ceil(vocab / tp_size)``;
    rows past the vocabulary on the last rank are zero padding."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup | None = None) -> None:
        super().__init__()
        self.tp = tp or TPGroup.single()
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.rows_per_rank = -(-vocab_size // self.tp.size)
        self.vocab_start = self.tp.rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        self.weight = _new_param(self.rows_per_rank, hidden_size, loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        _check_shape(loaded_weight, (self.vocab_size, self.hidden_size))
        n = max(self.vocab_end - self.vocab_start, 0)
        if n:
            param.data[:n].copy_(_rows(loaded_weight, self.vocab_start, n))
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = torch.where(outside, 0, input_ids - self.vocab_start)
        out = F.embedding(local, self.weight).masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(out)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, hidden] -> [R, vocab]`` against these rows (used when embeddings are tied);
        every rank gets the whole vocabulary (all-gather)."""
        logits = self.tp.all_gather(linear(hidden, self.weight))
        return logits[..., :self.vocab_size] if self.tp.size > 1 else logits


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, sharded by vocabulary rows like the embedding."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.compute_logits(hidden)
