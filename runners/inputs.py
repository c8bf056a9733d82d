"""Step inputs: what one step feeds the model, built from the persistent batch (vectorised numpy
into fixed step buffers, then one upload per buffer), and the padding that static shapes need.

The ``DevicePlan`` says how a step's token and request counts round up (``DevicePlan.shape``:
static-shape buckets, the captured decode batch sizes, the piecewise token counts). Padding is
inert: slot -1, seq_len 0, null block 0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from attention import AttentionMetadata
from attention.metadata import shared_prefix_len
from attention.backend import AttentionBackend
from runners.input_batch import InputBatch
from runners.plan import DevicePlan, pad_to
from runners.step_buffers import StepBuffers


@dataclass
class StepInputs:
    """One step's model inputs (device tensors) and what the host needs after sampling."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    md: AttentionMetadata
    logits_indices: torch.Tensor
    req_ids: list[str]
    sample_rows: np.ndarray  # persistent rows that get a token this step, in batch order (+ padding)
    sample_mask: np.ndarray  # per request in batch order: does it sample?
    # Image embeddings for some of this step's tokens: (token indices, [K, hidden]); None without.
    mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None


class InputBuilder:
    """Fills ``buffers`` from ``input_batch`` for one step; see ``build``."""

    def __init__(self, buffers: StepBuffers, input_batch: InputBatch, attn_backend: type[AttentionBackend],
                 plan: DevicePlan, block_size: int, max_model_len: int, max_blocks_per_req: int,
                 position_offset: np.ndarray | None = None) -> None:
        """``position_offset``: per persistent row, added to the rotary positions the model sees
        (not to the KV slots): M-RoPE's decode delta, under which a text token is at index + delta."""
        self.buffers, self.input_batch, self.attn_backend, self.plan = buffers, input_batch, attn_backend, plan
        self.block_size, self.max_model_len, self.max_blocks_per_req = block_size, max_model_len, max_blocks_per_req
        self.position_offset = position_offset

    def build(self, req_ids: list[str], rows: np.ndarray, num_sched: np.ndarray,
              dummy: bool = False) -> StepInputs:
        """Vectorised: positions, token ids, slots, block table, query starts, seq lens of
        ``num_sched[i]`` tokens for the request in row ``rows[i]``. ``dummy``: fake requests
        from position 0, slots -1 (the KV cache is untouched), block tables on the null block."""
        self.buffers.next_set()
        b, ib, bs = self.buffers.np, self.input_batch, self.block_size
        n_reqs, n = len(num_sched), int(num_sched.sum())
        n_pad, r_pad, static = self.plan.shape(n, n_reqs)
        cu = np.cumsum(num_sched)
        computed = np.zeros(n_reqs, np.int32) if dummy else ib.num_computed[rows]
        seq_lens = computed + num_sched
        if n == n_reqs:  # pure decode
            req_idx, pos = np.arange(n_reqs), computed.astype(np.int64)
        else:
            req_idx = np.repeat(np.arange(n_reqs), num_sched)
            pos = np.arange(n) - np.repeat(cu - num_sched, num_sched) + computed[req_idx]
        b["positions"][:n] = pos if self.position_offset is None or dummy else pos + self.position_offset[rows[req_idx]]
        b["positions"][n:n_pad] = 0
        b["input_ids"][n:n_pad] = 0
        b["slot_mapping"][n:n_pad] = -1
        qsl = b["query_start_loc"]
        qsl[0] = 0
        qsl[1:n_reqs + 1] = cu
        qsl[n_reqs + 1:r_pad + 1] = n
        b["seq_lens"][:n_reqs] = seq_lens
        b["seq_lens"][n_reqs:r_pad] = 0
        max_seq, max_q = int(seq_lens.max()), int(num_sched.max())
        nb = -(-max_seq // bs)
        if static:  # shapes and launch decisions must not depend on this step's lengths
            nb, max_seq, max_q = self.max_blocks_per_req, self.max_model_len, 1 if n == n_reqs else n_pad
        bt = b["block_table"][:r_pad * nb].reshape(r_pad, nb)
        if dummy:
            b["input_ids"][:n] = 0
            b["slot_mapping"][:n] = -1
            bt[:] = 0
            sample_mask = np.zeros(n_reqs, dtype=bool)
        else:
            tok_rows = rows[req_idx]
            b["input_ids"][:n] = ib.token_ids[tok_rows, pos]
            b["slot_mapping"][:n] = ib.block_table[tok_rows, pos // bs].astype(np.int64) * bs + pos % bs
            bt[:n_reqs] = ib.block_table[rows, :nb]
            bt[n_reqs:] = 0
            sample_mask = seq_lens >= ib.num_tokens[rows]
        sample_idx, sample_rows = cu[sample_mask] - 1, rows[sample_mask]
        if self.plan.req_buckets and len(sample_idx):  # static sampler shapes: repeat the last row
            extra = pad_to(len(sample_idx), self.plan.req_buckets) - len(sample_idx)
            sample_idx = np.pad(sample_idx, (0, extra), "edge")
            sample_rows = np.pad(sample_rows, (0, extra), "edge")
        b["logits_indices"][:len(sample_idx)] = sample_idx
        to = self.buffers.to_device
        shared, shared_dev = 0, None
        if self.attn_backend.wants_shared_prefix():
            if n == n_reqs and not dummy:
                shared = shared_prefix_len(bt[:n_reqs], seq_lens, bs)
            b["shared_prefix"][0] = shared
            shared_dev = to("shared_prefix", 1)
        md = AttentionMetadata(
            query_start_loc=to("query_start_loc", r_pad + 1), seq_lens=to("seq_lens", r_pad),
            block_table=to("block_table", r_pad * nb, (r_pad, nb)), slot_mapping=to("slot_mapping", n_pad),
            max_query_len=max_q, max_seq_len=max_seq, num_actual_tokens=n, num_reqs=n_reqs,
            query_start_loc_cpu=qsl[:r_pad + 1], seq_lens_cpu=b["seq_lens"][:r_pad],
            shared_prefix_len=shared, shared_prefix=shared_dev)
        return StepInputs(to("input_ids", n_pad), to("positions", n_pad), self.attn_backend.prepare(md),
                          to("logits_indices", len(sample_idx)), req_ids, sample_rows, sample_mask)

    def dummy(self, num_tokens: int, num_reqs: int, cascade: bool = False) -> StepInputs | None:
        """Inputs of ``num_tokens`` tokens spread over ``num_reqs`` fake requests. ``cascade``
        (pure decode, for graph capture): the step as the backend's ``prepare`` takes it when
        the requests claim to share their whole prompts (host) while the device holds 0 shared
        keys - None unless that is a cascade step."""
        num_sched = np.full(num_reqs, num_tokens // num_reqs, dtype=np.int32)
        num_sched[: num_tokens % num_reqs] += 1
        step = self.build([f"_dummy{i}" for i in range(num_reqs)], np.zeros(num_reqs, np.int64), num_sched,
                          dummy=True)
        if not cascade:
            return step
        if step.md.shared_prefix is None:  # the backend takes no cascades
            return None
        md = self.attn_backend.prepare(dataclasses.replace(step.md, extra=None, shared_prefix_len=self.max_model_len))
        return dataclasses.replace(step, md=md) if md.cascade_prefix_len else None
