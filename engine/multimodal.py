"""Multimodal inputs as the engine sees them: plain data, no torch.

An image of a prompt occupies a run of placeholder tokens (``offset``, ``length``) in the
prompt's token ids; its preprocessed pixels travel opaquely (numpy) to the runner, whose
vision encoder turns them into exactly ``length`` embeddings. The scheduler uses the ranges
(an encoder budget per step) and the content hashes (prefix-cache keys); the entrypoint makes
these from the user's images (entrypoints/multimodal.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class MultiModalInput:
    """One image: its placeholder range in the prompt, content hash and encoder inputs."""

    offset: int  # index of its first placeholder token in the prompt
    length: int  # placeholder tokens = encoder output embeddings
    content_hash: bytes  # sha256 of the preprocessed pixels and grid: equal images, equal hash
    pixel_values: np.ndarray  # the image processor's patches [t*h*w, C*T*P*P]
    grid_thw: tuple[int, int, int]  # patches along time, height and width

    @property
    def end(self) -> int:
        return self.offset + self.length


def overlapping(mm_inputs: tuple[MultiModalInput, ...] | list[MultiModalInput], start: int,
                end: int) -> list[int]:
    """Indices of the images whose placeholder range meets tokens ``[start, end)`` (sorted by offset)."""
    out = []
    for i, mm in enumerate(mm_inputs):
        if mm.offset >= end:
            break
        if mm.end > start:
            out.append(i)
    return out


def fit_encoder_budget(mm_inputs: tuple[MultiModalInput, ...], start: int, n: int, fresh: bool,
                       budget: int) -> tuple[int, int]:
    """``(tokens to schedule, encoder tokens they cost)`` for scheduling tokens ``[start, start + n)``.

    An image costs its ``length`` in the step that first meets it: the step that reaches its
    first placeholder, or any step that meets it while ``fresh`` (the first step since
    admission: after a prefix hit or preemption the runner holds no encoder output). An image
    that does not fit the budget ends the chunk just before it (possibly at 0 tokens).
    """
    cost = 0
    for i in overlapping(mm_inputs, start, start + n):
        mm = mm_inputs[i]
        if fresh or mm.offset >= start:
            if cost + mm.length > budget:
                return max(mm.offset - start, 0), cost
            cost += mm.length
    return n, cost
