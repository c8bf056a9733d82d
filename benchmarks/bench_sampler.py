"""pytest-benchmark: the sampler on this CPU, 256 requests x vocab 128k.

Run: ``python -m pytest benchmarks/bench_sampler.py --benchmark-only``. Each round samples
fresh logits (the sampler works in place); metadata is prepared outside the timed call.
"""
import pytest
import torch

from benchmarks.gpu_sampler import build_case
from runners.sampler import Sampler

ROWS, VOCAB = 256, 131072
CASES = ["greedy", "top_k=50 top_p=0.9", "penalties + top_k/top_p", "logprobs=5 + top_k/top_p",
         "top_p=0.9 (no top_k: full sort)"]


@pytest.mark.parametrize("case", CASES)
def test_sampler_cpu(benchmark, case):
    st, rows = build_case(case, ROWS, VOCAB, "cpu")
    base = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(0)) * 4
    sampler = Sampler()

    def setup():
        return (base.clone(), st.prepare(rows)), {}

    out = benchmark.pedantic(sampler, setup=setup, rounds=5, iterations=1, warmup_rounds=1)
    assert out.sampled_token_ids.shape == (ROWS,)


def test_prepare_cpu(benchmark):
    st, rows = build_case("mixed (4 kinds)", ROWS, VOCAB, "cpu")
    md = benchmark(st.prepare, rows)
    assert md.num_rows == ROWS
