"""The one attention-metadata object every backend reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """Per-step layout of a mixed batch (decodes and prefill chunks together).

    Request ``r`` owns query tokens ``query_start_loc[r]:query_start_loc[r+1]``; they are
    the last ``q_len`` positions of its ``seq_lens[r]`` tokens, so token ``i`` sits at
    position ``seq_lens[r] - q_len + i`` and attends causally to positions ``<=`` it, read
    from the paged cache through ``block_table[r]`` (KV of the new tokens is written
    first, by ``slot_mapping``). Padding is inert: tokens past ``num_actual_tokens`` have
    slot -1; request rows past ``num_reqs`` have ``q_len == 0``, ``seq_len == 0`` and
    block table entries 0 (the null block).
    """

    query_start_loc: torch.Tensor  # int32 [num_reqs_padded + 1]
    seq_lens: torch.Tensor  # int32 [num_reqs_padded]
    block_table: torch.Tensor  # int32 [num_reqs_padded, max_blocks_per_req]
    slot_mapping: torch.Tensor  # int64 [num_tokens_padded]
    max_query_len: int
    max_seq_len: int
    num_actual_tokens: int
    num_reqs: int
    # Host copies of the same values (no device sync needed to branch on them).
    query_start_loc_cpu: np.ndarray
    seq_lens_cpu: np.ndarray
    # Backend-owned per-step data, built once per step by ``AttentionBackend.prepare`` (or, where it
    # needs the cache's shape, by the backend at the step's first layer, for the others to reuse).
    extra: Any = None
    # Pure decode: the first ``shared_prefix_len`` keys of every request (before its last one)
    # lie in the same pages for all of the step's requests (a prompt prefix they share); only
    # recorded for a backend that ``wants_shared_prefix``.
    shared_prefix_len: int = 0
    # The same length on the device (int32 [1], a fixed step buffer): what cascade kernels read,
    # so that a captured graph serves every prefix. Set when the backend wants the shared prefix.
    shared_prefix: torch.Tensor | None = None
    # Set by a backend's ``prepare``: the keys it attends once for all requests (cascade), from
    # the shared prefix; such a step replays a cascade graph of its size (the kernels take the
    # length from ``shared_prefix``), not the plain decode graph.
    cascade_prefix_len: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def is_pure_decode(self) -> bool:
        return self.max_query_len == 1


def shared_prefix_len(block_table: np.ndarray, seq_lens: np.ndarray, block_size: int) -> int:
    """Keys (whole pages) at the start of every request's sequence, before its last key, that all
    requests read through the same pages: ``block_table [R, nb]``/``seq_lens [R]`` of the real
    requests (host). 0 for fewer than two requests."""
    if len(seq_lens) < 2:
        return 0
    pages = (int(seq_lens.min()) - 1) // block_size
    if pages <= 0 or not (block_table[:, 0] == block_table[0, 0]).all():  # the common case: no sharing
        return 0
    same = (block_table[:, :pages] == block_table[0, :pages]).all(axis=0)
    return (pages if same.all() else int(same.argmin())) * block_size


def dummy_prefill(num_tokens: int, block_size: int, device: torch.device, cached: int = 0) -> AttentionMetadata:
    """One request of ``num_tokens`` new tokens after ``cached`` cached ones, its pages all the
    null block and its slots -1 (nothing is written): for warm-up launches whose output is dropped."""
    n, total = num_tokens, num_tokens + cached
    qsl, lens = np.array([0, n], np.int32), np.array([total], np.int32)
    return AttentionMetadata(
        torch.from_numpy(qsl).to(device), torch.from_numpy(lens).to(device),
        torch.zeros(1, -(-total // block_size), dtype=torch.int32, device=device),
        torch.full((n,), -1, dtype=torch.int64, device=device), n, total, n, 1, qsl, lens)
