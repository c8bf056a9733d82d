"""Prompt logprobs (``SamplingParams.prompt_logprobs``): the logprobs of each prompt token given
the tokens before it, from the hidden states of the step that computed them.

A prefill chunk covering positions ``[c, c + n)`` of a request gives the entries of prompt tokens
``c + 1 .. min(c + n, P - 1)``: position ``p``'s logits score token ``p + 1``. Like sampled-token
logprobs they come from the raw distribution (``log_softmax`` of the logits): each entry holds
the actual prompt token first, then the top-k, and the actual token's rank. Such requests get
no prefix-cache hits (engine/block_manager.py), so every prompt position is computed here.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from engine.outputs import SampleLogprobs


def prompt_logprobs(runner: Any, req_ids: list[str], hidden: torch.Tensor
                    ) -> dict[str, tuple[int, list[SampleLogprobs]]] | None:
    """Entries for this step's requests that asked for prompt logprobs (None when none did).
    ``runner``: the ``ModelRunnerBase`` whose step produced ``hidden`` (its step buffers and
    persistent batch still describe that step)."""
    ib, qsl = runner.input_batch, runner.buffers.np["query_start_loc"]
    spans: list[tuple[str, int, int, int, int]] = []  # (req id, row, first flat index, first position, count)
    for i, rid in enumerate(req_ids):
        st = runner.requests[rid]
        if st.sampling_params.prompt_logprobs is None:
            continue
        start, end = int(qsl[i]), int(qsl[i + 1])
        first = int(ib.num_computed[st.row])
        count = min(first + end - start, st.num_prompt_tokens - 1) - first
        if count > 0:
            spans.append((rid, st.row, start, first, count))
    if not spans:
        return None
    flat = np.concatenate([np.arange(s, s + n) for _, _, s, _, n in spans])
    targets = np.concatenate([ib.token_ids[row, p + 1:p + 1 + n] for _, row, _, p, n in spans]).astype(np.int64)
    top = max(runner.requests[rid].sampling_params.prompt_logprobs for rid, *_ in spans)
    dev = hidden.device
    logits = runner.model.compute_logits(hidden[torch.from_numpy(flat).to(dev)]).float()
    lp = torch.log_softmax(logits, dim=-1)
    tok = torch.from_numpy(targets).to(dev).unsqueeze(1)
    tok_lp = lp.gather(1, tok)
    ranks = ((lp > tok_lp).sum(dim=-1) + 1).tolist()
    ids, vals = tok, tok_lp
    if top > 0:
        best = torch.topk(lp, top, dim=-1)
        ids, vals = torch.cat([tok, best.indices], dim=1), torch.cat([tok_lp, best.values], dim=1)
    ids_l, vals_l = ids.tolist(), vals.tolist()
    out: dict[str, tuple[int, list[SampleLogprobs]]] = {}
    k = 0
    for rid, _, _, first, n in spans:
        want = runner.requests[rid].sampling_params.prompt_logprobs + 1
        out[rid] = (first + 1, [SampleLogprobs(ids_l[j][:want], vals_l[j][:want], ranks[j]) for j in range(k, k + n)])
        k += n
    return out
