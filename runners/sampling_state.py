"""Per-row sampling state of the persistent batch.

Each live request owns a row in ``[0, max_num_reqs)``. Its parameters, seed and number of
generated tokens live in host (numpy) arrays; penalty token counts live on the device,
``[max_num_reqs, V]``, allocated the first time a request asks for a penalty.

Randomness: the uniform a row draws with depends only on (its 64-bit seed, the index of the
token being generated), through a splitmix64 stream computed on the host. A seeded request
therefore samples the same tokens alone, in any batch, under chunked prefill and after
preemption (re-added with its outputs, it resumes at the right index). Unseeded requests get
a seed from the state's own generator (seeded by the engine ``seed``) at first admission.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engine.sampling_params import SamplingParams
from runners.sampling_metadata import HostRows, SamplingMetadata, build_metadata

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrap-around is numpy's defined behaviour)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniform_noise(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The ``positions``-th output of a splitmix64 stream per seed, as float32 in [0, 1)
    with 24 random bits (exact in float32)."""
    state = _mix64(np.asarray(seeds, dtype=np.uint64))
    x = _mix64(state + (np.asarray(positions, dtype=np.uint64) + np.uint64(1)) * _GOLDEN)
    return ((x >> np.uint64(40)).astype(np.float64) * 2.0**-24).astype(np.float32)


class SamplingState:
    """Sampling parameters, seeds and penalty counts of the persistent batch's rows."""

    def __init__(self, max_num_reqs: int, vocab_size: int, device: torch.device | str, seed: int,
                 eos_token_ids: Sequence[int] = (), num_candidates: int | None = None) -> None:
        """``num_candidates``: random rows with ``0 < top_k <= num_candidates`` are filtered and
        drawn among their top candidates only (a speed knob; the result is the same as over the
        whole vocabulary). Default: 1024 on accelerators (topk costs the same there), 128 on CPU."""
        if max_num_reqs <= 0 or vocab_size <= 0:
            raise ValueError(f"max_num_reqs and vocab_size must be > 0, got {max_num_reqs}, {vocab_size}")
        self.max_num_reqs, self.vocab_size = max_num_reqs, vocab_size
        self.device = torch.device(device)
        self.eos_token_ids = np.asarray([t for t in eos_token_ids if 0 <= t < vocab_size], dtype=np.int64)
        if num_candidates is None:
            num_candidates = 128 if self.device.type == "cpu" else 1024
        self.num_candidates = min(num_candidates, vocab_size)
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._pin = self.device.type != "cpu" and _can_pin()
        n = max_num_reqs
        self.active = np.zeros(n, dtype=bool)
        self.greedy = np.zeros(n, dtype=bool)
        self.temperature = np.ones(n, dtype=np.float32)
        self.top_k = np.zeros(n, dtype=np.int64)
        self.top_p = np.ones(n, dtype=np.float32)
        self.min_p = np.zeros(n, dtype=np.float32)
        self.presence = np.zeros(n, dtype=np.float32)
        self.frequency = np.zeros(n, dtype=np.float32)
        self.repetition = np.ones(n, dtype=np.float32)
        self.logprobs = np.full(n, -1, dtype=np.int64)
        self.seeds = np.zeros(n, dtype=np.uint64)
        self.num_generated = np.zeros(n, dtype=np.int64)
        self.min_tokens = np.zeros(n, dtype=np.int64)
        self._min_tokens_ids: list[np.ndarray] = [np.zeros(0, np.int64)] * n
        self.counts: torch.Tensor | None = None  # int32 [max_num_reqs, V], lazily
        self.prompt_mask: torch.Tensor | None = None  # bool [max_num_reqs, V], lazily
        self._last: tuple[np.ndarray, torch.Tensor] | None = None

    # Requests -------------------------------------------------------------------------
    def add_request(self, row: int, params: SamplingParams, prompt_token_ids: Sequence[int],
                    output_token_ids: Sequence[int] = (), seed: int | None = None) -> int:
        """Put a request in ``row``; returns the seed it samples with: ``params.seed``, else
        ``seed`` (pass back the one returned at first admission), else a fresh draw."""
        if not 0 <= row < self.max_num_reqs:
            raise ValueError(f"row must be in [0, {self.max_num_reqs}), got {row}")
        if params.seed is not None:
            seed = params.seed
        elif seed is None:
            seed = int(self._rng.integers(0, 2**63, dtype=np.int64))
        self.active[row] = True
        self.greedy[row] = params.greedy
        self.temperature[row] = params.temperature
        k = params.top_k
        self.top_k[row] = k if 0 < k < self.vocab_size else 0
        self.top_p[row] = params.top_p
        self.min_p[row] = params.min_p
        self.presence[row] = params.presence_penalty
        self.frequency[row] = params.frequency_penalty
        self.repetition[row] = params.repetition_penalty
        self.logprobs[row] = -1 if params.logprobs is None else min(params.logprobs, self.vocab_size)
        self.seeds[row] = np.uint64(seed)
        self.num_generated[row] = len(output_token_ids)
        self.min_tokens[row] = params.min_tokens
        ids = set(t for t in params.stop_token_ids if t < self.vocab_size)
        if not params.ignore_eos:
            ids.update(self.eos_token_ids.tolist())
        self._min_tokens_ids[row] = np.asarray(sorted(ids), dtype=np.int64)
        if params.needs_penalties:
            self._init_penalty_row(row, params.repetition_penalty != 1.0, prompt_token_ids,
                                   output_token_ids)
        return seed

    def remove_request(self, row: int) -> None:
        self.active[row] = False
        self._min_tokens_ids[row] = np.zeros(0, np.int64)

    def _init_penalty_row(self, row: int, repetition: bool, prompt: Sequence[int],
                          outputs: Sequence[int]) -> None:
        V, dev = self.vocab_size, self.device
        prompt_a, out_a = np.asarray(prompt, np.int64), np.asarray(outputs, np.int64)
        for name, a in (("prompt_token_ids", prompt_a), ("output_token_ids", out_a)):
            if a.size and (a.min() < 0 or a.max() >= V):
                raise ValueError(f"{name} must be token ids in [0, {V})")
        if self.counts is None:
            self.counts = torch.zeros(self.max_num_reqs, V, dtype=torch.int32, device=dev)
        self.counts[row].zero_()
        if out_a.size:
            ids = torch.from_numpy(out_a).to(dev)
            self.counts[row].index_add_(0, ids, torch.ones(len(out_a), dtype=torch.int32, device=dev))
        if repetition:
            if self.prompt_mask is None:
                self.prompt_mask = torch.zeros(self.max_num_reqs, V, dtype=torch.bool, device=dev)
            self.prompt_mask[row].zero_()
            if prompt_a.size:
                self.prompt_mask[row].index_fill_(0, torch.from_numpy(prompt_a).to(dev), True)

    # Steps ----------------------------------------------------------------------------
    def prepare(self, rows: np.ndarray) -> SamplingMetadata:
        """Metadata for the rows that sample this step (persistent rows, batch order)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.max_num_reqs or not self.active[rows].all()):
            raise ValueError(f"rows must be active rows in [0, {self.max_num_reqs}), got {rows.tolist()}")
        gen = self.num_generated[rows]
        pending = np.flatnonzero(gen < self.min_tokens[rows])
        flat = [b * self.vocab_size + self._min_tokens_ids[rows[b]] for b in pending.tolist()]
        h = HostRows(self.greedy[rows], self.temperature[rows], self.top_k[rows], self.top_p[rows],
                     self.min_p[rows], uniform_noise(self.seeds[rows], gen), self.presence[rows],
                     self.frequency[rows], self.repetition[rows], self.logprobs[rows], rows,
                     np.concatenate(flat) if flat else np.zeros(0, np.int64))
        md = build_metadata(h, self.vocab_size, self.num_candidates, self.device, self._pin,
                            self.counts, self.prompt_mask)
        self._last = (rows, md.state_rows)
        return md

    def prepare_dummy(self, num_rows: int) -> SamplingMetadata:
        """Metadata for profiling: ``num_rows`` random rows on the costliest path (top-p over
        the whole vocabulary, the most logprobs). Touches no row; no penalties (their count
        tensors are allocated only when a request asks for them)."""
        f32 = lambda v: np.full(num_rows, v, dtype=np.float32)  # noqa: E731
        i64 = lambda v: np.full(num_rows, v, dtype=np.int64)  # noqa: E731
        h = HostRows(np.zeros(num_rows, bool), f32(1.0), i64(0), f32(0.9), f32(0.0),
                     uniform_noise(i64(0), np.arange(num_rows)), f32(0.0), f32(0.0), f32(1.0),
                     i64(min(20, self.vocab_size)), i64(0), np.zeros(0, np.int64))
        return build_metadata(h, self.vocab_size, self.num_candidates, self.device, self._pin)

    def update(self, rows: np.ndarray, sampled: torch.Tensor) -> None:
        """After a step: one more generated token per row; penalty counts on the device."""
        rows = np.asarray(rows, dtype=np.int64)
        self.num_generated[rows] += 1
        if self.counts is None or rows.size == 0:
            return
        if self._last is not None and np.array_equal(self._last[0], rows):
            rows_t = self._last[1]
        else:
            rows_t = torch.from_numpy(rows).to(self.device)
        flat = rows_t * self.vocab_size + sampled.to(torch.int64)
        ones = torch.ones(rows.size, dtype=torch.int32, device=self.device)
        self.counts.view(-1).index_add_(0, flat, ones)  # integer atomics: exact, no sync


def _can_pin() -> bool:
    try:
        torch.empty(1, pin_memory=True)
        return True
    except (RuntimeError, NotImplementedError):
        return False
