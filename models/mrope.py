"""Multimodal RoPE (M-RoPE, Qwen2-VL): the rotary frequencies are split into three sections
rotated by a token's temporal, height and width positions.

Positions are ``[3, T]``; a text token has the same value in all three rows, which makes M-RoPE
equal to plain RoPE, so ``[T]`` positions (dummy runs) are accepted as that case.
"""
from __future__ import annotations

from typing import Any

import torch

from models.rotary import RopeInputs, RotaryEmbedding


class MRotaryEmbedding(RotaryEmbedding):
    """``sections`` (e.g. (16, 24, 24)) split the ``head_dim // 2`` frequencies in order:
    the first section follows row 0 (temporal), the next row 1 (height), then row 2 (width)."""

    def __init__(self, head_dim: int, max_position: int, theta: float, sections: tuple[int, ...],
                 scaling: dict[str, Any] | None = None) -> None:
        super().__init__(head_dim, max_position, theta, scaling)
        if sum(sections) != head_dim // 2:
            raise ValueError(f"mrope sections {sections} must add up to head_dim/2={head_dim // 2}")
        # which position row each frequency reads: [D/2] in {0, 1, 2}
        row = torch.repeat_interleave(torch.arange(len(sections)) % 3, torch.tensor(sections))
        self.register_buffer("section_row", row, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().cos_sin(positions, dtype)
        # [3, T, D/2] per row, then each frequency from its section's row -> [T, D/2]
        idx = self.section_row[None, :].expand(positions.shape[1], -1)[None]
        cos = self.cos_cache[positions].gather(0, idx).squeeze(0)
        sin = self.sin_cache[positions].gather(0, idx).squeeze(0)
        return cos.to(dtype)[:, None, :], sin.to(dtype)[:, None, :]

    def step_inputs(self, positions: torch.Tensor, x: torch.Tensor) -> RopeInputs:
        """Always the gathered cos/sin (the fused kernel looks up one position row only)."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return RopeInputs(positions, self.cos_cache, self.sin_cache, cos, sin)
