"""The sampler: penalties, min_tokens, greedy and random rows, logprobs, in one batch.

Order of operations per row: logprobs are taken from the raw model distribution
(``log_softmax`` of the logits as given: before penalties, min_tokens masking, temperature and
filters); then repetition, frequency and presence penalties; then min_tokens masks EOS and
``stop_token_ids``; then greedy rows take the argmax, and random rows draw from
``softmax(logits / temperature)`` restricted by top-k and min-p (which commute) and then by
top-p over the renormalised remainder. Tokens tied with the last kept one are kept.

A random row draws with one uniform ``u`` (from its seed and the index of the token being
generated): the token is the first, in token-id order, whose running probability exceeds
``u``. Everything a row's draw depends on is computed from that row alone, so it does not
depend on the rest of the batch. No host-device synchronisation: host flags come from the
metadata; the only read-back is the caller's, of ``sampled_token_ids``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.outputs import SampleLogprobs
from runners import sampling_ops as ops
from runners.sampling_metadata import FilterGroup, LogprobsGroup, SamplingMetadata


@dataclass
class LogprobsTensors:
    """Device tensors for the rows that asked for logprobs (``rows``: their batch positions).
    Column 0 is the sampled token, columns 1.. the top-n of the raw distribution."""

    num_rows: int
    rows: np.ndarray
    num: np.ndarray
    token_ids: torch.Tensor  # int64 [L, 1 + max_num]
    logprobs: torch.Tensor  # float32 [L, 1 + max_num]
    ranks: torch.Tensor  # int64 [L], 1 = most likely

    def to_lists(self) -> list[SampleLogprobs | None]:
        """One entry per batch row (None where not asked); reads the tensors back to the host."""
        out: list[SampleLogprobs | None] = [None] * self.num_rows
        ids, lps, ranks = self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()
        for i, (row, n) in enumerate(zip(self.rows.tolist(), self.num.tolist())):
            out[row] = SampleLogprobs(ids[i][:n + 1], lps[i][:n + 1], ranks[i])
        return out


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # int64 [R], on the device
    logprobs: LogprobsTensors | None


def _select(x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    return x if idx is None else x.index_select(0, idx)


class Sampler:
    """Stateless; per-row state lives in ``SamplingState`` and arrives as ``SamplingMetadata``."""

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        """``logits``: float32 ``[R, V]`` (modified in place). Returns the sampled ids on the device."""
        if logits.dim() != 2 or tuple(logits.shape) != (md.num_rows, md.vocab_size):
            raise ValueError(f"logits must be [{md.num_rows}, {md.vocab_size}], got {tuple(logits.shape)}")
        if logits.dtype != torch.float32:
            raise ValueError(f"logits must be float32, got {logits.dtype}")
        logits = logits.contiguous()
        raw_logprobs = None
        if md.logprobs is not None:
            raw_logprobs = torch.log_softmax(_select(logits, md.logprobs.idx), dim=-1)
        if md.penalties is not None:
            logits = self._apply_penalties(logits, md)
        if md.min_tokens_flat is not None:
            logits.view(-1).index_fill_(0, md.min_tokens_flat, ops.NEG_INF)
        if md.num_greedy:
            sampled = logits.argmax(dim=-1)
        else:
            sampled = torch.empty(md.num_rows, dtype=torch.int64, device=logits.device)
        for group, candidates in ((md.candidates, True), (md.full, False)):
            if group is not None:
                tokens = self._sample_random(_select(logits, group.idx), group, candidates,
                                             md.num_candidates)
                if group.idx is None:
                    sampled = tokens
                else:
                    sampled.index_copy_(0, group.idx, tokens)
        lp = None
        if md.logprobs is not None:
            lp = self._gather_logprobs(raw_logprobs, sampled, md.logprobs, md.num_rows)
        return SamplerOutput(sampled, lp)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        g = md.penalties
        if g.row_start is not None:
            rows = lambda t: t.narrow(0, g.row_start, g.state_rows.shape[0])  # noqa: E731
        else:
            rows = lambda t: t.index_select(0, g.state_rows)  # noqa: E731
        counts = rows(g.counts)
        prompt = None if g.prompt_mask is None else rows(g.prompt_mask)
        sub = ops.apply_penalties(_select(logits, g.idx), counts, prompt, g.presence, g.frequency,
                                  g.repetition, g.use_repetition, g.use_additive)
        if g.idx is None:
            return sub
        return logits.index_copy_(0, g.idx, sub)

    @staticmethod
    def _sample_random(logits: torch.Tensor, g: FilterGroup, candidates: bool,
                       num_candidates: int) -> torch.Tensor:
        if candidates:
            return ops.sample_candidates(logits, num_candidates, g.inv_temp, g.top_k, g.top_p,
                                         g.min_p_offset, g.uniform, g.any_top_p, g.any_min_p)
        return ops.sample_full(logits, g.inv_temp, g.top_k, g.top_p, g.min_p_offset, g.uniform,
                               g.max_top_k, g.any_top_p, g.any_min_p)

    @staticmethod
    def _gather_logprobs(raw: torch.Tensor, sampled: torch.Tensor, g: LogprobsGroup,
                         num_rows: int) -> LogprobsTensors:
        tok = _select(sampled, g.idx).unsqueeze(1)
        tok_lp = raw.gather(1, tok)
        ranks = (raw > tok_lp).sum(dim=-1) + 1
        ids, lps = tok, tok_lp
        if g.max_num > 0:
            top = torch.topk(raw, g.max_num, dim=-1)
            ids, lps = torch.cat([tok, top.indices], dim=1), torch.cat([tok_lp, top.values], dim=1)
        return LogprobsTensors(num_rows, g.rows, g.num, ids, lps, ranks)
