"""Attention for XLA (TPUs): every shape is static, so a padding bucket compiles once.

Two paths behind one backend:

- Static reference (any device; what runs on XLA's CPU client): the torch reference math
  with no host loop and no data-dependent shape. Queries are cut into fixed tiles per request
  (built from ``query_start_loc`` with static-shape ops), each tile gathers its request's
  whole block table (``max_blocks * block_size`` keys), a mask from ``seq_lens`` and
  causality, one SDPA, and the slots are gathered back to tokens. Memory grows with
  ``(T + R * tile) * max_model_len``: fine for tests and modest batches; the kernel serves.
- Pallas (a real TPU, with torch_xla's ``ragged_paged_attention`` kernel and JAX): the
  ragged kernel reads the pages directly. It wants K and V interleaved per head
  (``[num_blocks, block_size, 2 * num_kv_heads, head_dim]``), while the runner's cache is
  ``[2, num_blocks, block_size, num_kv_heads, head_dim]``, so this path re-lays the cache out
  every step (a copy of the layer's cache): correct, but a backend-chosen cache layout would
  remove it. The kernel cannot run without a TPU; its arguments are checked on the CPU against
  torch_xla's own non-kernel reference (tests/tpu/test_xla_attn.py).

The KV write is ``torch_ref.write_kv_cache``'s (padding slots to the null block) as a single
``index_copy_`` over the flattened cache, marked as a donated buffer, so XLA updates it in place.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from attention.backend import AttentionBackend
from attention.metadata import AttentionMetadata
from attention.torch_ref import _sdpa, gather_kv

QUERY_TILE = 16  # query slots per tile of the static path


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


@functools.cache
def donation_available() -> bool:
    """True where torch_xla can mark the KV cache as a donated buffer (so the compiled step
    updates it in place instead of returning a new copy of the whole cache)."""
    if importlib.util.find_spec("torch_xla") is None:
        return False
    try:
        import torch_xla  # noqa: F401  (registers the op since 2.5)

        if not hasattr(torch.ops.xla, "dynamo_set_buffer_donor_"):
            import torch_xla.experimental.dynamo_set_buffer_donor  # noqa: F401  (before 2.5)
        return hasattr(torch.ops.xla, "dynamo_set_buffer_donor_")
    except (ImportError, RuntimeError, AttributeError):
        return False


def write_kv_cache_flat(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """``torch_ref.write_kv_cache`` as one ``index_copy_`` over the whole flattened cache (V's
    slots offset by ``num_blocks * block_size``), padding slots (-1) sent to the null block.
    XLA updates a donated cache in place this way; writing K and V through the two halves'
    views instead copied the whole cache every step (215 ms vs 0.4 ms at 268 MB, XLA CPU)."""
    n = slot_mapping.shape[0]
    flat = kv_cache.view(-1, kv_cache.shape[-2], kv_cache.shape[-1])
    slots = slot_mapping.clamp_min(0)
    idx = torch.cat((slots, slots + flat.shape[0] // 2))
    flat.index_copy_(0, idx, torch.cat((k[:n], v[:n])).to(kv_cache.dtype))


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

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale)
        # Decided here, not in forward (which dynamo traces): TPU lanes want head_dim % 128 == 0.
        self.use_pallas = head_dim % 128 == 0 and pallas_available()
        self.donate = donation_available()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor | None, md: AttentionMetadata) -> torch.Tensor:
        if kv_cache is not None:
            if self.donate and kv_cache.device.type == "xla":  # else each step copies the cache
                torch.ops.xla.dynamo_set_buffer_donor_(kv_cache, True)
            write_kv_cache_flat(k, v, kv_cache, md.slot_mapping)
            if self.use_pallas and q.device.type == "xla":
                return torch.ops.xla.ragged_paged_attention(
                    *pallas_inputs(q, kv_cache, md), sm_scale=self.scale, use_kernel=True)
        return static_attention(q, k, v, kv_cache, md, self.scale)


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                     md: AttentionMetadata, scale: float, tile: int = QUERY_TILE) -> torch.Tensor:
    """q ``[T, Hq, D]`` -> ``[T, Hq, D]``. Shapes depend only on T, R, ``max_query_len`` and the
    block-table width: no host value and no other per-step Python int is read.

    Each request's queries are cut into tiles of ``qt = min(tile, max_query_len)`` slots; a
    static count of tiles (``min(R, T)`` when one tile holds any request, else
    ``min(T, R + T // qt)``, which bounds ``sum(ceil(q_len / qt))``) each attends over its
    request's whole block table. Scores take ``tiles * qt * L``, about ``(T + R * qt) * L``.
    """
    num_tokens, num_rows, q_max = q.shape[0], md.seq_lens.shape[0], md.max_query_len
    qt = min(tile, q_max)
    num_tiles = min(num_rows, num_tokens) if qt >= q_max else min(num_tokens, num_rows + num_tokens // qt)
    dev = q.device
    qsl = md.query_start_loc.long()
    starts, q_lens, seq_lens = qsl[:-1], qsl[1:] - qsl[:-1], md.seq_lens.long()
    tiles_end = ((q_lens + qt - 1) // qt).cumsum(0)  # [R]
    tiles_start = tiles_end - (q_lens + qt - 1) // qt
    tile_ids = torch.arange(num_tiles, device=dev)
    req = (tile_ids[:, None] >= tiles_end).sum(-1).clamp(max=num_rows - 1)  # [NT]: owner request
    q_off = (tile_ids - tiles_start[req])[:, None] * qt + torch.arange(qt, device=dev)  # [NT, qt]
    src = (starts[req, None] + q_off).clamp(max=num_tokens - 1)  # the token in each query slot
    if kv_cache is None:  # no cache (profiling): every request starts at 0, keys are its new tokens
        new = (starts[req, None] + torch.arange(q_max, device=dev)).clamp(max=num_tokens - 1)
        keys, vals = k[new], v[new]
    else:
        keys, vals = gather_kv(kv_cache, md.block_table[req])  # [NT, nb * block_size, Hkv, D]
    lens = seq_lens[req, None]
    q_pos = lens - q_lens[req, None] + q_off  # [NT, qt]
    k_pos = torch.arange(keys.shape[1], device=dev)
    mask = (k_pos <= q_pos[..., None]) & (k_pos < lens[..., None])
    mask = mask | (k_pos == 0)  # keeps empty slots finite; real ones always see position 0
    out = _sdpa(q[src], keys, vals, mask, scale)  # [NT, qt, Hq, D]
    tok = torch.arange(num_tokens, device=dev)
    row = (tok[:, None] >= qsl[1:]).sum(-1).clamp(max=num_rows - 1)  # [T]: owner request
    off = tok - starts[row]
    slot = ((tiles_start[row] + off // qt) * qt + off % qt).clamp(0, num_tiles * qt - 1)
    return out.reshape(num_tiles * qt, *out.shape[2:])[slot]
