"""Attention for XLA (TPUs): every shape is static, so a padding bucket compiles once.

Two paths behind one backend:

- Static reference (any device; what runs on XLA's CPU client): the torch reference math
  with no host loop and no data-dependent shape. Each padded request row gathers its whole
  block table (``[R, max_blocks * block_size]`` keys), queries are gathered into
  ``[R, max_query_len]`` slots from ``query_start_loc``, a mask from ``seq_lens`` and
  causality, one SDPA, and the slots are gathered back to tokens. Memory grows with
  ``R * max_query_len * max_model_len``: fine for tests and small batches, not for serving.
- Pallas (a real TPU, with torch_xla's ``ragged_paged_attention`` kernel and JAX): the
  ragged kernel reads the pages directly. It wants K and V interleaved per head
  (``[num_blocks, block_size, 2 * num_kv_heads, head_dim]``), while the runner's cache is
  ``[2, num_blocks, block_size, num_kv_heads, head_dim]``, so this path re-lays the cache out
  every step (a copy of the layer's cache): correct, but a backend-chosen cache layout would
  remove it. The kernel cannot run without a TPU; its arguments are checked on the CPU against
  torch_xla's own non-kernel reference (tests/tpu/test_xla_attn.py).

The KV write is ``torch_ref.write_kv_cache``: ``index_copy`` with padding slots sent to the
null block, a static-shape scatter.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from attention.backend import AttentionBackend
from attention.metadata import AttentionMetadata
from attention.torch_ref import _sdpa, gather_kv, write_kv_cache


@functools.cache
def pallas_available() -> bool:
    """True on a real TPU where torch_xla's ragged paged attention kernel can be traced."""
    if importlib.util.find_spec("torch_xla") is None or importlib.util.find_spec("jax") is None:
        return False
    try:
        import torch_xla.experimental.custom_kernel  # noqa: F401  (registers torch.ops.xla.*)
        import torch_xla.runtime as xr

        return xr.device_type() == "TPU" and hasattr(torch.ops.xla, "ragged_paged_attention")
    except (ImportError, RuntimeError, AttributeError):
        return False


def pallas_inputs(q: torch.Tensor, kv_cache: torch.Tensor, md: AttentionMetadata) -> tuple[torch.Tensor, ...]:
    """The kernel's positional inputs: (q, kv_pages, kv_lens, page_indices, cu_q_lens, num_seqs).

    ``kv_pages`` interleaves K and V per KV head (K at even, V at odd combined heads);
    ``num_seqs`` is computed on the device (padded rows have ``seq_len == 0``), so no Python
    int that changes per step reaches the compiled graph.
    """
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    pages = torch.stack((kv_cache[0], kv_cache[1]), dim=3).reshape(
        num_blocks, block_size, 2 * num_kv_heads, head_dim)
    num_seqs = (md.seq_lens > 0).sum().to(torch.int32).reshape(1)
    return q, pages, md.seq_lens, md.block_table, md.query_start_loc, num_seqs


class XlaAttentionBackend(AttentionBackend):
    """Static shapes for XLA; the Pallas ragged kernel on a TPU when it applies."""

    name = "xla"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        if kv_cache is not None:
            write_kv_cache(k, v, kv_cache, md.slot_mapping)
            if self.head_dim % 128 == 0 and q.device.type == "xla" and pallas_available():
                return torch.ops.xla.ragged_paged_attention(
                    *pallas_inputs(q, kv_cache, md), sm_scale=self.scale, use_kernel=True)
        return static_attention(q, k, v, kv_cache, md, self.scale)


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                     md: AttentionMetadata, scale: float) -> torch.Tensor:
    """q ``[T, Hq, D]`` -> ``[T, Hq, D]``; shapes depend only on T, R, ``max_query_len`` and
    the block-table width. Reads no host value and no per-step Python int but ``max_query_len``."""
    num_tokens, num_rows, q_max = q.shape[0], md.seq_lens.shape[0], md.max_query_len
    dev = q.device
    qsl = md.query_start_loc.long()
    starts, q_lens = qsl[:-1], qsl[1:] - qsl[:-1]
    seq_lens = md.seq_lens.long()
    slot = torch.arange(q_max, device=dev)
    src = (starts[:, None] + slot).clamp(max=num_tokens - 1)  # [R, Q]: the token in each query slot
    if kv_cache is None:  # no cache (profiling): every request starts at 0, keys are its new tokens
        keys, vals = k[src], v[src]
    else:
        keys, vals = gather_kv(kv_cache, md.block_table)  # [R, nb * block_size, Hkv, D]
    q_pos = seq_lens[:, None] - q_lens[:, None] + slot  # [R, Q]
    k_pos = torch.arange(keys.shape[1], device=dev)
    mask = (k_pos <= q_pos[..., None]) & (k_pos < seq_lens[:, None, None])
    mask = mask | (k_pos == 0)  # keeps padding rows finite; real rows always see position 0
    out = _sdpa(q[src], keys, vals, mask, scale)  # [R, Q, Hq, D]
    tok = torch.arange(num_tokens, device=dev)
    row = (tok[:, None] >= qsl[None, 1:]).sum(-1).clamp(max=num_rows - 1)  # [T]: owner request
    off = (tok - starts[row]).clamp(0, q_max - 1)
    return out.reshape(num_rows * q_max, *out.shape[2:])[row * q_max + off]
