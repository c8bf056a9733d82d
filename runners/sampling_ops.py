"""The sampler's tensor kernels: penalties, filter thresholds and inverse-CDF draws.

Every filter is a per-row logit threshold (keep ``logit >= thr``), so top-k, top-p and
min-p compose by taking the largest threshold, and tokens tied with the last kept one are
kept too. Nothing here reads a device value on the host.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, prompt_mask: torch.Tensor | None,
                    presence: torch.Tensor, frequency: torch.Tensor, repetition: torch.Tensor,
                    use_repetition: bool, use_additive: bool) -> torch.Tensor:
    """vLLM/OpenAI penalties on ``logits [P, V]``, in place (also returned).

    ``counts [P, V]`` counts generated tokens; ``prompt_mask [P, V]`` marks prompt tokens.
    Repetition (prompt + generated tokens): positive logits divided (multiplied by the
    reciprocal), negative ones multiplied.
    Then frequency (times the count) and presence (once) are subtracted, generated tokens only.
    Penalty tensors are ``[P, 1]``.
    """
    occurred = counts > 0
    if use_repetition:
        unseen = ~occurred if prompt_mask is None else torch.logical_or(prompt_mask, occurred).logical_not_()
        factor = torch.where(logits > 0, 1.0 / repetition, repetition).masked_fill_(unseen, 1.0)
        logits = logits.mul_(factor)
    if use_additive:
        adj = torch.mul(counts, frequency).addcmul_(occurred, presence)
        logits = logits.sub_(adj)
    return logits


def top_p_threshold(sorted_vals: torch.Tensor, row_max: torch.Tensor, inv_temp: torch.Tensor,
                    thr: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """The logit threshold of the nucleus, given a row's values sorted descending.

    ``sorted_vals [N, C]`` may be only the C best values (candidates) when the tokens kept by
    ``thr`` (top-k / min-p, ``[N, 1]``; None = none) are among them. The nucleus is the
    shortest prefix whose mass (softmax at ``inv_temp``, renormalised over ``logit >= thr``)
    reaches ``top_p``; a row with ``top_p >= 1`` gets ``-inf``. Returns ``[N, 1]``.
    """
    c = torch.cumsum(_weights(sorted_vals, row_max, inv_temp, thr), dim=-1)
    # Position j is kept iff the mass before it is < p * total; c is non-decreasing, so the
    # kept positions are a prefix of length 1 + #{j < C-1 : c_j < p * total}.
    budget = top_p * c[:, -1:]
    n_keep = (c[:, :-1] < budget).sum(dim=-1, keepdim=True) + 1
    thr_p = sorted_vals.gather(1, n_keep - 1)
    return torch.where(top_p < 1.0, thr_p, NEG_INF)


def kth_value(sorted_vals: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """The k-th largest value per row (``-inf`` where ``top_k == 0``); ``top_k [N, 1]``."""
    kth = sorted_vals.gather(1, (top_k - 1).clamp_(min=0, max=sorted_vals.shape[1] - 1))
    return torch.where(top_k > 0, kth, NEG_INF)


def _weights(vals: torch.Tensor, row_max: torch.Tensor, inv_temp: torch.Tensor,
             thr: torch.Tensor | None) -> torch.Tensor:
    w = torch.sub(vals, row_max).mul_(inv_temp).exp_()
    return w if thr is None else w.masked_fill_(vals < thr, 0.0)


def _max(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.maximum(a, b)


def sample_inverse_cdf(vals: torch.Tensor, row_max: torch.Tensor, inv_temp: torch.Tensor,
                       thr: torch.Tensor | None, uniform: torch.Tensor) -> torch.Tensor:
    """Draw one index per row with probability proportional to ``exp((v - max) * inv_temp)``
    over ``v >= thr``: the first index whose running sum exceeds ``uniform * total``.

    ``uniform [N, 1]`` in [0, 1) with 24 random bits, so ``uniform * total < total`` holds in
    float32 and a zero-weight index is never chosen. Returns int64 ``[N, 1]``.
    """
    c = torch.cumsum(_weights(vals, row_max, inv_temp, thr), dim=-1)
    target = uniform * c[:, -1:]
    # == searchsorted(c, target, right=True); a compare-and-count lowers on every backend (XLA too)
    return (c <= target).sum(-1, keepdim=True).clamp_(max=vals.shape[1] - 1)


def sample_candidates(logits: torch.Tensor, num_candidates: int, inv_temp: torch.Tensor,
                      top_k: torch.Tensor, top_p: torch.Tensor, min_p_offset: torch.Tensor,
                      uniform: torch.Tensor, any_top_p: bool, any_min_p: bool) -> torch.Tensor:
    """Rows whose ``0 < top_k <= num_candidates``: everything happens on the top candidates.

    The draw walks the kept candidates in token-id order, so it picks exactly the token that
    ``sample_full`` picks (the same weights in the same order) without touching the rest of
    the vocabulary; the one exception is a tie at the k-th value that runs past the last
    candidate (the tokens beyond are left out). ``min_p_offset = T * log(min_p)`` (``-inf`` =
    off). Returns int64 ``[N]``.
    """
    vals, ids = torch.topk(logits, num_candidates, dim=-1)  # sorted descending
    row_max = vals[:, :1]
    thr = kth_value(vals, top_k)
    if any_min_p:
        thr = torch.maximum(thr, row_max + min_p_offset)
    if any_top_p:
        thr = torch.maximum(thr, top_p_threshold(vals, row_max, inv_temp, thr, top_p))
    ids, order = torch.sort(ids, dim=-1)
    j = sample_inverse_cdf(vals.gather(1, order), row_max, inv_temp, thr, uniform)
    return ids.gather(1, j).squeeze(1)


def sample_full(logits: torch.Tensor, inv_temp: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, min_p_offset: torch.Tensor, uniform: torch.Tensor,
                max_top_k: int, any_top_p: bool, any_min_p: bool) -> torch.Tensor:
    """Random rows over the whole vocabulary (in token-id order). Top-p needs the rows sorted;
    top-k alone only needs ``topk(max_top_k)``; temperature and min-p need neither."""
    ranked = None
    if any_top_p:
        ranked = torch.sort(logits, dim=-1, descending=True).values
    elif max_top_k > 0:
        ranked = torch.topk(logits, max_top_k, dim=-1).values
    row_max = logits.amax(dim=-1, keepdim=True) if ranked is None else ranked[:, :1]
    thr = kth_value(ranked, top_k) if max_top_k > 0 else None
    if any_min_p:
        thr = _max(thr, row_max + min_p_offset)
    if any_top_p:
        thr = _max(thr, top_p_threshold(ranked, row_max, inv_temp, thr, top_p))
    return sample_inverse_cdf(logits, row_max, inv_temp, thr, uniform).squeeze(1)
