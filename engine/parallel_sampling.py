"""``SamplingParams.n > 1``: a prompt fans out into ``n`` requests (one per sample) that the
scheduler sees as independent; they share the prompt's KV blocks through prefix caching (a block
is registered when the step that fills it is scheduled, so samples admitted in the same step hit
it). Their outputs merge back into one ``RequestOutput`` per prompt."""
from __future__ import annotations

import dataclasses
from typing import Sequence

from engine.outputs import RequestOutput


def sample_request_ids(parent_id: str, n: int) -> list[str]:
    """The request ids of a prompt's samples: the prompt's own id when ``n == 1``, else ``"{i}_{id}"``."""
    return [parent_id] if n == 1 else [f"{i}_{parent_id}" for i in range(n)]


def merge_samples(parent_id: str, outs: Sequence[RequestOutput]) -> RequestOutput:
    """One output for a prompt from its samples' outputs (in sample order): completions indexed
    0..n-1, finished when all are; cached tokens and metrics are the first sample's."""
    if len(outs) == 1:
        return outs[0]
    first = outs[0]
    completions = [dataclasses.replace(o.outputs[0], index=i) for i, o in enumerate(outs)]
    return dataclasses.replace(first, request_id=parent_id, outputs=completions,
                               finished=all(o.finished for o in outs))
