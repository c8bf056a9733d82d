"""One step's sampling inputs, grouped by the path each row takes through the sampler.

``build_metadata`` turns per-row host arrays (batch order) into device tensors with one
float32 and one int64 host->device copy; every flag the sampler branches on is decided
here, from numpy. A group's ``idx`` holds its rows' batch positions (``None``: every row,
in batch order, so the sampler skips the gather).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FilterGroup:
    """Random rows that share a path (candidates or whole vocabulary). Tensors are ``[n, 1]``."""

    idx: torch.Tensor | None
    inv_temp: torch.Tensor
    top_k: torch.Tensor  # int64, 0 = off
    top_p: torch.Tensor
    min_p_offset: torch.Tensor  # temperature * log(min_p); -inf = off
    uniform: torch.Tensor  # [0, 1), from (seed, index of the generated token)
    max_top_k: int
    any_top_p: bool
    any_min_p: bool


@dataclass
class PenaltyGroup:
    """Rows with a penalty; ``state_rows`` index the state's persistent count tensors."""

    idx: torch.Tensor | None
    state_rows: torch.Tensor  # int64 [n]
    counts: torch.Tensor  # int32 [max_num_reqs, V], generated tokens
    prompt_mask: torch.Tensor | None  # bool [max_num_reqs, V], when repetition is used
    presence: torch.Tensor
    frequency: torch.Tensor
    repetition: torch.Tensor
    use_repetition: bool
    use_additive: bool
    row_start: int | None = None  # state_rows == row_start + arange(n): slice, do not gather


@dataclass
class LogprobsGroup:
    """Rows that asked for logprobs: ``rows`` (host) and ``idx`` (device) are batch positions."""

    idx: torch.Tensor | None
    rows: np.ndarray
    num: np.ndarray  # top-n per row
    max_num: int


@dataclass
class SamplingMetadata:
    num_rows: int
    vocab_size: int
    num_greedy: int
    candidates: FilterGroup | None  # random rows with 0 < top_k <= num_candidates
    num_candidates: int
    full: FilterGroup | None  # the other random rows
    penalties: PenaltyGroup | None
    min_tokens_flat: torch.Tensor | None  # flat indices (row * V + id) to mask with -inf
    logprobs: LogprobsGroup | None
    state_rows: torch.Tensor | None = None  # persistent rows, for SamplingState.update

    @property
    def all_greedy(self) -> bool:
        return self.num_greedy == self.num_rows


@dataclass
class HostRows:
    """Per-row host arrays of one step, in batch order."""

    greedy: np.ndarray  # bool
    temperature: np.ndarray
    top_k: np.ndarray  # int64, 0 = off (already clamped to the vocabulary)
    top_p: np.ndarray
    min_p: np.ndarray
    uniform: np.ndarray
    presence: np.ndarray
    frequency: np.ndarray
    repetition: np.ndarray
    logprobs: np.ndarray  # int64, -1 = none
    state_rows: np.ndarray  # int64
    min_tokens_flat: np.ndarray  # int64, flat indices to mask


class _Upload:
    """Collects small arrays; ships them as one float32 and one int64 tensor."""

    def __init__(self) -> None:
        self._parts: dict[type, list[np.ndarray]] = {np.float32: [], np.int64: []}
        self._slots: list[tuple[type, int, int, tuple[int, ...]]] = []
        self._size = {np.float32: 0, np.int64: 0}

    def add(self, arr: np.ndarray, dtype: type, shape: tuple[int, ...] | None = None) -> int:
        a = np.ascontiguousarray(arr, dtype=dtype).ravel()
        self._parts[dtype].append(a)
        self._slots.append((dtype, self._size[dtype], a.size, shape or (a.size,)))
        self._size[dtype] += a.size
        return len(self._slots) - 1

    def send(self, device: torch.device, pin: bool) -> list[torch.Tensor]:
        flat = {dt: _to_device(np.concatenate(p) if p else np.zeros(0, dt), device, pin)
                for dt, p in self._parts.items()}
        return [flat[dt][off:off + n].view(shape) for dt, off, n, shape in self._slots]


def _to_device(a: np.ndarray, device: torch.device, pin: bool) -> torch.Tensor:
    t = torch.from_numpy(a)
    if device.type == "cpu":
        return t
    if pin:  # the caching host allocator keeps a pinned block until its copy has run
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t)
        return staged.to(device, non_blocking=True)
    return t.to(device)


def build_metadata(h: HostRows, vocab_size: int, num_candidates: int, device: torch.device,
                   pin: bool, counts: torch.Tensor | None = None,
                   prompt_mask: torch.Tensor | None = None) -> SamplingMetadata:
    """Group the rows and upload their parameters (the counts tensors are the state's own)."""
    n = len(h.greedy)
    up = _Upload()
    col = (-1, 1)
    random = ~h.greedy
    cand = random & (h.top_k > 0) & (h.top_k <= num_candidates)
    full = random & ~cand
    on = h.min_p > 0
    min_p_offset = np.where(on, np.log(np.where(on, h.min_p, 1.0)) * h.temperature, -np.inf)
    inv_temp = np.where(random, 1.0 / np.maximum(h.temperature, 1e-30), 1.0)
    groups: dict[str, tuple] = {}
    for name, mask in (("cand", cand), ("full", full)):
        sel = np.flatnonzero(mask)
        if sel.size == 0:
            continue
        slots = [None if sel.size == n else up.add(sel, np.int64),
                 up.add(inv_temp[sel], np.float32, col), up.add(h.top_k[sel], np.int64, col),
                 up.add(h.top_p[sel], np.float32, col), up.add(min_p_offset[sel], np.float32, col),
                 up.add(h.uniform[sel], np.float32, col)]
        groups[name] = (slots, int(h.top_k[sel].max()), bool((h.top_p[sel] < 1.0).any()),
                        bool((h.min_p[sel] > 0.0).any()))
    use_rep = h.repetition != 1.0
    use_add = (h.presence != 0.0) | (h.frequency != 0.0)
    pen = np.flatnonzero(use_rep | use_add)
    pen_slots = None
    if pen.size:
        if counts is None or (use_rep.any() and prompt_mask is None):
            raise ValueError("penalties requested but the state has no count tensors")
        pen_slots = [None if pen.size == n else up.add(pen, np.int64),
                     up.add(h.state_rows[pen], np.int64), up.add(h.presence[pen], np.float32, col),
                     up.add(h.frequency[pen], np.float32, col),
                     up.add(h.repetition[pen], np.float32, col)]
    mt_slot = up.add(h.min_tokens_flat, np.int64) if h.min_tokens_flat.size else None
    lp = np.flatnonzero(h.logprobs >= 0)
    lp_slot = up.add(lp, np.int64) if 0 < lp.size < n else None
    rows_slot = up.add(h.state_rows, np.int64)
    t = up.send(device, pin)
    get = (lambda s: None if s is None else t[s])

    def group(name: str) -> FilterGroup | None:
        if name not in groups:
            return None
        slots, max_k, any_p, any_mp = groups[name]
        idx, inv_t, top_k, top_p, mp, u = (get(s) for s in slots)
        return FilterGroup(idx, inv_t, top_k, top_p, mp, u, max_k, any_p, any_mp)

    penalties = None
    if pen_slots is not None:
        idx, srows, pres, freq, rep = (get(s) for s in pen_slots)
        r = h.state_rows[pen]
        contiguous = bool((np.diff(r) == 1).all())
        penalties = PenaltyGroup(idx, srows, counts, prompt_mask if use_rep.any() else None,
                                 pres, freq, rep, bool(use_rep.any()), bool(use_add.any()),
                                 int(r[0]) if contiguous else None)
    logprobs = None
    if lp.size:
        nums = h.logprobs[lp]
        logprobs = LogprobsGroup(get(lp_slot), lp, nums, int(nums.max()))
    return SamplingMetadata(n, vocab_size, int(h.greedy.sum()), group("cand"),
                            min(num_candidates, vocab_size), group("full"), penalties, get(mt_slot),
                            logprobs, t[rows_slot])
