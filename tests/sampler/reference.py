"""Plain (float64, loop-based) reference implementations and helpers for the sampler tests."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from engine.sampling_params import SamplingParams
from runners.sampler import Sampler, SamplerOutput
from runners.sampling_state import SamplingState


def ref_penalties(logits: Sequence[float], prompt: Sequence[int], outputs: Sequence[int],
                  p: SamplingParams) -> list[float]:
    """vLLM/OpenAI semantics, one token at a time."""
    out = [float(x) for x in logits]
    seen = set(prompt) | set(outputs)
    for t in range(len(out)):
        if t in seen and p.repetition_penalty != 1.0:
            out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
        n = outputs.count(t)
        out[t] -= p.frequency_penalty * n + (p.presence_penalty if n else 0.0)
    return out


def ref_probs(logits: Sequence[float], p: SamplingParams) -> np.ndarray:
    """The exact distribution a random row samples from: softmax(logits / T), top-k and min-p
    (tokens tied with the k-th kept), then top-p over the renormalised rest: a token stays when
    the mass of strictly more probable tokens is < top_p."""
    x = np.asarray(logits, dtype=np.float64)
    probs = np.exp((x - x.max()) / p.temperature)
    probs /= probs.sum()
    keep = np.ones(len(x), dtype=bool)
    if 0 < p.top_k < len(x):
        keep &= x >= np.sort(x)[::-1][p.top_k - 1]
    if p.min_p > 0:
        keep &= probs >= p.min_p * probs.max()
    q = np.where(keep, probs, 0.0)
    q /= q.sum()
    if p.top_p < 1:
        above = np.array([q[x > x[i]].sum() for i in range(len(x))])
        q = np.where(keep & (above < p.top_p), q, 0.0)
        q /= q.sum()
    return q


def make_state(params: Sequence[SamplingParams], vocab: int, prompts: Sequence[Sequence[int]] | None = None,
               outputs: Sequence[Sequence[int]] | None = None, seed: int = 0,
               eos: Sequence[int] = (), rows: Sequence[int] | None = None,
               max_reqs: int | None = None, device: str = "cpu", **kw: object) -> tuple[SamplingState, np.ndarray]:
    n = len(params)
    rows = np.arange(n) if rows is None else np.asarray(rows)
    st = SamplingState(max_reqs or max(int(rows.max()) + 1, 1), vocab, device, seed, eos, **kw)
    for i, p in enumerate(params):
        st.add_request(int(rows[i]), p, prompts[i] if prompts else [0], outputs[i] if outputs else ())
    return st, rows


def sample(params: Sequence[SamplingParams], logits: torch.Tensor, **kw: object) -> SamplerOutput:
    """Sample one step for rows with ``params`` (fresh state) on a copy of ``logits``."""
    st, rows = make_state(params, logits.shape[1], **kw)
    return Sampler()(logits.to(st.device, copy=True), st.prepare(rows))


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Upper quantile of chi-square (Wilson-Hilferty); z=3.719 is the 1e-4 tail."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * a ** 0.5) ** 3


def chi2_stat(counts: np.ndarray, probs: np.ndarray, n: int) -> tuple[float, int]:
    """Pearson's statistic over tokens of non-zero probability and its degrees of freedom;
    a token of zero probability that was drawn gives infinity."""
    if counts[probs == 0].any():
        return float("inf"), 1
    live = probs > 0
    exp = probs[live] * n
    return float(((counts[live] - exp) ** 2 / exp).sum()), max(int(live.sum()) - 1, 1)
