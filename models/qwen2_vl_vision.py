"""The Qwen2-VL / Qwen2.5-VL vision transformer: patch embedding, 2-D rotary, bidirectional
attention within each image (Qwen2.5: within windows, except the full-attention blocks), and
the 2x2 patch merger that projects to the language model's width.

Input: the image processor's ``pixel_values`` ``[sum(t*h*w), C*T*P*P]`` of several images
and their ``grid_thw``; output: ``[sum(t*h*w) / merge**2, hidden]``, images in order. The
weights are replicated on every tensor-parallel rank (the layers below run with one rank).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.layers import (ColumnParallelLinear, MergedColumnParallelLinear, RMSNorm, RowParallelLinear,
                           SiluAndMul, _new_param, default_weight_loader)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in float32 (as HF's vision tower does); ``cos``/``sin`` ``[N, 1, D/2]``."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = ColumnParallelLinear(dim, 3 * dim, bias=True)
        self.proj = RowParallelLinear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, segments: list[tuple[torch.Tensor, int]], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = torch.empty_like(q)
        for idx, length in segments:  # each segment attends to itself only; equal lengths in one batch
            seg = [t[idx].view(-1, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v)]
            out[idx] = F.scaled_dot_product_attention(*seg).transpose(1, 2).reshape(-1, self.num_heads, self.head_dim)
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    """Qwen2-VL: fc1 -> quick GELU -> fc2. Qwen2.5-VL: SwiGLU (gate/up packed, as in the LM)."""

    def __init__(self, dim: int, hidden: int, gated: bool) -> None:
        super().__init__()
        self.gated = gated
        if gated:
            self.gate_up_proj = MergedColumnParallelLinear(dim, [hidden, hidden], bias=True)
            self.act: nn.Module = SiluAndMul()
            self.down_proj = RowParallelLinear(hidden, dim, bias=True)
        else:
            self.fc1 = ColumnParallelLinear(dim, hidden, bias=True)
            self.act = QuickGELU()
            self.fc2 = RowParallelLinear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return self.down_proj(self.act(self.gate_up_proj(x)))
        return self.fc2(self.act(self.fc1(x)))


def _norm(dim: int, rms: bool) -> nn.Module:
    return RMSNorm(dim, 1e-6) if rms else nn.LayerNorm(dim, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qwen25: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = _norm(dim, qwen25), _norm(dim, qwen25)
        self.attn = VisionAttention(dim, num_heads)
        self.mlp = VisionMLP(dim, mlp_hidden, gated=qwen25)

    def forward(self, x: torch.Tensor, segments: list[tuple[torch.Tensor, int]], cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), segments, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 block of neighbouring patches (adjacent in the input order) -> one LM token."""

    def __init__(self, out_dim: int, context_dim: int, merge: int, qwen25: bool) -> None:
        super().__init__()
        self.width = context_dim * merge * merge
        self.ln_q = _norm(context_dim, qwen25)
        self.mlp = nn.Sequential(ColumnParallelLinear(self.width, self.width, bias=True), nn.GELU(),
                                 RowParallelLinear(self.width, out_dim, bias=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


def patch_positions(grid_thw: list[tuple[int, int, int]], merge: int) -> np.ndarray:
    """``[N, 2]`` (row, column) of every patch, in the processor's order: merge blocks row-major,
    the patches of a block row-major inside it, repeated for each temporal slice."""
    out = []
    for t, h, w in grid_thw:
        hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        hw = np.stack([hh.reshape(shape).transpose(0, 2, 1, 3).ravel(),
                       ww.reshape(shape).transpose(0, 2, 1, 3).ravel()], axis=1)
        out.append(np.tile(hw, (t, 1)))
    return np.concatenate(out)


def segments(cu_seqlens: list[int], device: torch.device) -> list[tuple[torch.Tensor, int]]:
    """Attention segments ``[cu[i], cu[i+1])`` grouped by length: (token indices of every segment of
    that length, the length), so each group is one batched attention call."""
    cu = np.asarray(cu_seqlens)
    starts, lengths = cu[:-1], np.diff(cu)
    out = []
    for length in np.unique(lengths[lengths > 0]).tolist():
        idx = (starts[lengths == length][:, None] + np.arange(length)).ravel()
        out.append((torch.from_numpy(idx).to(device), length))
    return out


def window_index(grid_thw: list[tuple[int, int, int]], merge: int, window: int) -> tuple[np.ndarray, list[int]]:
    """Qwen2.5-VL's windows of ``window`` x ``window`` merged tokens: the permutation of merged
    tokens that makes every window contiguous, and the windows' cumulative patch counts."""
    index, cu, base = [], [0], 0
    for t, h, w in grid_thw:
        gh, gw = h // merge, w // merge
        ids = np.arange(t * gh * gw).reshape(t, gh, gw)
        for ti in range(t):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    block = ids[ti, r:r + window, c:c + window].ravel()
                    index.append(block + base)
                    cu.append(cu[-1] + block.size * merge * merge)
        base += t * gh * gw
    return np.concatenate(index), cu


class VisionTransformer(nn.Module):
    """``vision`` is the checkpoint's ``vision_config``; ``out_dim`` the LM's hidden size."""

    def __init__(self, vision: dict[str, Any], out_dim: int, qwen25: bool) -> None:
        super().__init__()
        dim = vision["hidden_size"] if qwen25 else vision["embed_dim"]
        heads, depth = vision["num_heads"], vision["depth"]
        self.qwen25 = qwen25
        self.patch = vision.get("patch_size", 14)
        self.temporal = vision.get("temporal_patch_size", 2)
        self.channels = vision.get("in_channels", vision.get("in_chans", 3))
        self.merge = vision.get("spatial_merge_size", 2)
        self.window = vision.get("window_size", 112) // self.merge // self.patch if qwen25 else 0
        self.full_blocks = set(vision.get("fullatt_block_indexes", ())) if qwen25 else set(range(depth))
        mlp_hidden = vision["intermediate_size"] if qwen25 else int(dim * vision.get("mlp_ratio", 4))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Module()
        # Conv3d with stride == kernel over one patch each is a linear map of the flattened patch.
        self.patch_embed.proj.weight = _new_param(dim, self.channels, self.temporal, self.patch, self.patch,
                                                  loader=default_weight_loader)
        self.blocks = nn.ModuleList(VisionBlock(dim, heads, mlp_hidden, qwen25) for _ in range(depth))
        self.merger = PatchMerger(vision.get("out_hidden_size", out_dim) if qwen25 else out_dim, dim,
                                  self.merge, qwen25)
        head_dim = dim // heads
        rope_theta = (vision.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        spatial = head_dim // 2
        inv = 1.0 / (rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        weight = self.patch_embed.proj.weight
        x = F.linear(pixel_values.to(weight.dtype).reshape(-1, weight[0].numel()), weight.flatten(1))
        pos = torch.from_numpy(patch_positions(grid_thw, self.merge)).to(x.device)
        freqs = (pos[..., None].float() * self.inv_freq).flatten(1)  # [N, D/2]: rows' then columns'
        cos, sin = freqs.cos()[:, None, :], freqs.sin()[:, None, :]
        full = segments(np.cumsum([0] + [h * w for t, h, w in grid_thw for _ in range(t)]).tolist(), x.device)
        unit = self.merge * self.merge
        order = windows = None
        if self.qwen25:
            idx, cu_win = window_index(grid_thw, self.merge, self.window)
            windows = segments(cu_win, x.device)
            order = torch.from_numpy(idx).to(x.device)
            permute = (order[:, None] * unit + torch.arange(unit, device=x.device)).flatten()
            x, cos, sin = x[permute], cos[permute], sin[permute]
        for i, blk in enumerate(self.blocks):
            x = blk(x, full if i in self.full_blocks else windows, cos, sin)
        merged = self.merger(x)
        if order is not None:
            merged = merged[torch.argsort(order)]
        return merged
