"""Prefix gather for the Triton backend's prefill blocks: a step whose prefill rows read each cached
page through several query blocks copies those pages, request after request, into contiguous K/V
rows once per layer (``gather_pages``), which the blocks then read by whole tiles like the step's
new rows (TMA on Hopper) instead of page by page. ``plan_prefix_gather`` decides it per step from
host ints and builds the page list on the device (no host sync); the backend keeps the plan in
``md.extra`` for the step's other layers. Only prefill steps gather; they are never captured."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attention.metadata import AttentionMetadata

# prefix gather: when, over the step's cached prefix pages, the query blocks reading each page
# average at least this many (a page copied once then read N times by tiles beats N paged reads;
# timed at N = 64 on an H200, not yet near the threshold)
GATHER_MIN_READS = 4
GATHER_MAX_TOKENS = 16384  # the most prefix tokens copied per layer (or twice the step's tokens)


@dataclass(frozen=True)
class PrefixGather:
    """One step's cached prefix pages of its prefill rows (q_len >= 2, cached prefix > 0), in
    request order: ``page_ids`` ``[num_pages]`` (cache pages), ``page_rows`` ``[num_pages]`` (how
    many of each page's slots hold prefix keys; the copy zeroes the rest) and ``first_page``
    ``[R_pad]`` (where request ``r``'s pages start in that list). Built on the device from the
    step's metadata without a host sync; ``num_pages == 0``: this step does not gather, and then
    ``cached_pages`` says whether its prefill rows read cached pages at all (page by page)."""

    page_ids: torch.Tensor | None
    first_page: torch.Tensor | None
    num_pages: int
    page_rows: torch.Tensor | None = None
    cached_pages: int = 0  # the prefill rows' cached prefix pages, gathered or not


NO_GATHER = PrefixGather(None, None, 0)


def plan_prefix_gather(md: AttentionMetadata, block_size: int, block_q: int,
                       force: bool | None = None) -> PrefixGather:
    """The step's ``PrefixGather``, or ``NO_GATHER`` where it does not pay (``force=None``: the
    query blocks reading each cached page average fewer than ``GATHER_MIN_READS``, or the copy
    would exceed ``max(GATHER_MAX_TOKENS, 2 * md.num_tokens)`` tokens) or nothing is cached.
    ``force=True`` gathers any cached prefix (tests, benchmarks), ``False`` never. Decided from
    the host copies; the page list itself is computed on the device."""
    qsl, lens = md.query_start_loc_cpu.astype(np.int64), md.seq_lens_cpu.astype(np.int64)
    q_len = qsl[1:] - qsl[:-1]
    ctx = lens - q_len
    rows = (q_len >= 2) & (ctx > 0)
    pages = np.where(rows, -(-ctx // block_size), 0)
    num_pages = int(pages.sum())
    if num_pages == 0:
        return NO_GATHER
    paged = PrefixGather(None, None, 0, cached_pages=num_pages)  # read page by page
    if force is False:
        return paged
    if force is None:
        reads = int((np.where(rows, -(-q_len // block_q), 0) * pages).sum())
        if reads < GATHER_MIN_READS * num_pages or \
                num_pages * block_size > max(GATHER_MAX_TOKENS, 2 * md.num_tokens):
            return paged
    qsl_d, lens_d = md.query_start_loc.long(), md.seq_lens.long()
    q_len_d = qsl_d[1:] - qsl_d[:-1]
    ctx_d = lens_d - q_len_d
    pages_d = torch.where((q_len_d >= 2) & (ctx_d > 0), (ctx_d + block_size - 1) // block_size, 0)
    first = torch.cumsum(pages_d, 0) - pages_d
    req = torch.repeat_interleave(torch.arange(len(pages_d), device=pages_d.device), pages_d,
                                  output_size=num_pages)  # output_size: no host sync
    in_req = torch.arange(num_pages, device=req.device) - first[req]  # page i of its request
    page_ids = md.block_table[req, in_req]
    page_rows = (ctx_d[req] - in_req * block_size).clamp(0, block_size).to(torch.int32)
    return PrefixGather(page_ids, first.to(torch.int32), num_pages, page_rows, num_pages)


def gather_pages(kv_cache: torch.Tensor, gather: PrefixGather) -> torch.Tensor:
    """``kv_cache[:, gather.page_ids]`` as ``[2, pages * block_size, Hk, D]``, one Triton copy
    (torch's indexing of the middle dimension ran at a fifth of the copy bandwidth on an H200),
    with each page's slots past its prefix (``page_rows``) zero: every row is finite, so a kernel
    may multiply the rows past a prefix by a zero probability without masking them."""
    from attention.triton_cache_kernels import gather_pages_kernel  # triton is optional: imported on use
    block_size, hk, d = kv_cache.shape[2:]
    if not kv_cache[0].is_contiguous():
        raise ValueError("prefix gather needs each of K and V's caches contiguous")
    page_elems = block_size * hk * d
    out = kv_cache.new_empty(2, gather.num_pages * block_size, hk, d)
    block = min(4096, 1 << (page_elems - 1).bit_length())
    gather_pages_kernel[(gather.num_pages, 2, -(-page_elems // block))](
        kv_cache, out, gather.page_ids, gather.page_rows, gather.num_pages, kv_cache.stride(0),
        PAGE_ELEMS=page_elems, ROW_ELEMS=hk * d, BLOCK=block, num_warps=4)
    return out
