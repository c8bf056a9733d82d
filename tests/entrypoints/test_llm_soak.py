"""Soak: 10,000 requests of random lengths through LLM.generate over the fake executor, in a
small pool (preemption and prefix hits throughout), with random aborts mid-run. Every
non-aborted request completes, every aborted one is reported as aborted, the pool is whole."""
from __future__ import annotations

import random

import pytest

from engine import SamplingParams
from tests.entrypoints.fake_executor import assert_whole, fake_llm

pytestmark = pytest.mark.cpu


def test_soak_10k_requests_with_random_aborts() -> None:
    rng = random.Random(14)
    n = 10_000
    llm = fake_llm(runner_seed=1, device="cpu", block_size=8, num_kv_blocks=40, max_model_len=64,
                   max_num_batched_tokens=64, max_num_seqs=16)
    shared = [[rng.randrange(8) for _ in range(16)] for _ in range(4)]
    prompts = [rng.choice(shared + [[]])[:rng.randint(0, 16)] + [rng.randrange(8) for _ in range(rng.randint(1, 24))]
               for _ in range(n)]
    max_tokens = [rng.randint(1, 16) for _ in range(n)]
    asked: set[str] = set()

    def hook(when, k, so):
        live = list(llm.scheduler.requests)
        if when == "before" and live and rng.random() < 0.3:
            rid = rng.choice(live)
            asked.add(rid)
            llm.abort(rid)
    llm.executor.hook = hook
    outs = llm.generate(prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for m in max_tokens],
                        use_tqdm=False)
    assert [o.request_id for o in outs] == [f"req-{i}" for i in range(n)]
    aborted = {o.request_id for o in outs if o.outputs[0].finish_reason == "abort"}
    assert aborted <= asked and len(aborted) > 500, "aborts only where asked (some asked ones had finished)"
    for o, p, m in zip(outs, prompts, max_tokens):
        comp = o.outputs[0]
        assert o.finished and o.prompt_token_ids == p
        if o.request_id in aborted:
            assert len(comp.token_ids) < m
        else:
            assert comp.finish_reason == "length" and len(comp.token_ids) == m, (o.request_id, comp)
    assert llm.scheduler.num_preemptions > 0 and llm.scheduler.kv.num_hit_tokens > 0
    assert_whole(llm)
