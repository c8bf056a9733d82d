"""Rotary position embedding with a precomputed cos/sin cache indexed by positions."""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import nn

from models.fused_ops import fused_ops_enabled, rotary


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` in float32, computed the way HF does."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponent)
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "default":
        return inv_freq
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return inv_freq / factor
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, linear, llama3")
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths: divided by factor; short ones: kept; in between: interpolated
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE. The cache holds float32 cos and sin ``[max_pos, D/2]``;
    they are cast to the activations' dtype before use, as HF does, so results match it."""

    def __init__(self, head_dim: int, max_position: int, theta: float,
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embedding, got {head_dim}")
        self.head_dim = head_dim
        self.max_position = max_position
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_position, dtype=torch.int64).to(torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``[T, 1, D/2]`` cos and sin (computed once per step, shared by all layers)."""
        cos = self.cos_cache.index_select(0, positions).to(dtype)
        sin = self.sin_cache.index_select(0, positions).to(dtype)
        return cos[:, None, :], sin[:, None, :]

    def step_inputs(self, positions: torch.Tensor, x: torch.Tensor) -> RopeInputs:
        """Once per step for every layer: the fused kernel looks cos/sin up by position itself;
        the torch path gathers and casts them here (``x``: the activations, for device/dtype)."""
        if fused_ops_enabled(x):
            return RopeInputs(positions, self.cos_cache, self.sin_cache, None, None)
        cos, sin = self.cos_sin(positions, x.dtype)
        return RopeInputs(positions, self.cos_cache, self.sin_cache, cos, sin)


class RopeInputs(NamedTuple):
    """One step's rotary inputs; ``cos``/``sin`` (``[T, 1, D/2]``) are None on the fused path."""

    positions: torch.Tensor
    cos_cache: torch.Tensor
    sin_cache: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None


def apply_rope(q: torch.Tensor, k: torch.Tensor, rope: RopeInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hk, D]``: one fused launch, or ``apply_rotary`` twice."""
    if rope.cos is None or rope.sin is None:
        return rotary(q, k, rope.positions, rope.cos_cache, rope.sin_cache)
    return apply_rotary(q, rope.cos, rope.sin), apply_rotary(k, rope.cos, rope.sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]``: the same products and sums as HF's ``x*cos + rotate_half(x)*sin``."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
