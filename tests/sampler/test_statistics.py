"""Sampled frequencies match the exact filtered, renormalised softmax (chi-square, fixed seeds)."""
import zlib

import numpy as np
import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.sampler.reference import chi2_critical, chi2_stat, ref_probs, sample

pytestmark = pytest.mark.cpu

N = 6000  # identical rows with distinct seeds: one sampler call gives N draws
LOGITS = torch.tensor([1.2, -0.3, 2.1, 0.4, 0.9, -1.5, 1.9, 0.0, -0.7, 1.4, 0.2, -2.2])

CONFIGS = [
    dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.9),
    dict(top_k=3), dict(top_k=5, temperature=1.4),
    dict(top_p=0.5), dict(top_p=0.85), dict(top_p=0.97, temperature=1.5),
    dict(min_p=0.1), dict(min_p=0.35, temperature=0.8),
    dict(top_k=6, top_p=0.8, min_p=0.05, temperature=0.8),
]


def _draws(logits: torch.Tensor, kw: dict, num_candidates: int | None = None,
           seed_base: int = 0) -> np.ndarray:
    params = [SamplingParams(seed=seed_base + i, **kw) for i in range(N)]
    out = sample(params, logits.expand(N, -1), num_candidates=num_candidates)
    return np.bincount(out.sampled_token_ids.numpy(), minlength=logits.shape[0])


# num_candidates=0 sends top-k rows through the whole-vocabulary path too.
CASES = [(kw, None) for kw in CONFIGS] + [(kw, 0) for kw in CONFIGS if "top_k" in kw]


@pytest.mark.parametrize("kw,num_candidates", CASES,
                         ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict)
                         else ("full-vocab" if v == 0 else "default"))
def test_frequencies_match_reference(kw, num_candidates):
    counts = _draws(LOGITS, kw, num_candidates, seed_base=zlib.crc32(repr(kw).encode()))
    probs = ref_probs(LOGITS.tolist(), SamplingParams(**kw))
    stat, df = chi2_stat(counts, probs, N)
    assert stat < chi2_critical(df), (counts.tolist(), (probs * N).round(1).tolist())


def test_filters_really_remove_tokens():
    """The reference itself: each filter leaves fewer tokens than plain softmax."""
    full = (ref_probs(LOGITS.tolist(), SamplingParams()) > 0).sum()
    for kw in ({"top_k": 3}, {"top_p": 0.5}, {"min_p": 0.35}):
        assert (ref_probs(LOGITS.tolist(), SamplingParams(**kw)) > 0).sum() < full


@pytest.mark.parametrize("kw,expected", [
    (dict(top_k=2), {0, 1, 2}),  # tokens tied with the k-th are kept
    (dict(top_p=0.3), {0}),
    (dict(top_p=0.5), {0, 1, 2}),  # the nucleus reaches the tie: the whole tie stays
    (dict(min_p=0.5), {0, 1, 2}),
])
def test_ties_at_the_boundary_are_kept(kw, expected):
    logits = torch.tensor([1.0, 0.5, 0.5, -1.0, -1.0, -2.0])
    probs = ref_probs(logits.tolist(), SamplingParams(**kw))
    assert set(np.flatnonzero(probs)) == expected
    counts = _draws(logits, kw)
    assert set(np.flatnonzero(counts)) == expected
    stat, df = chi2_stat(counts, probs, N)
    assert stat < chi2_critical(df)


def test_large_vocabulary_top_p_and_min_p():
    """A 4096-token vocabulary: the top-p/min-p sets from the sort match the reference."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4096, generator=g) * 2.5
    for kw in (dict(top_p=0.3, temperature=0.9), dict(min_p=0.05, top_k=200)):
        params = [SamplingParams(seed=i, **kw) for i in range(2000)]
        out = sample(params, logits.expand(2000, -1)).sampled_token_ids.numpy()
        allowed = ref_probs(logits.tolist(), SamplingParams(**kw)) > 0
        assert allowed[out].all()
        assert 2 < allowed.sum() < 4096
