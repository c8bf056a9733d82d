"""CPU-side costs of the scheduler (pytest-benchmark).

Run:    python -m pytest benchmarks/bench_scheduler.py --benchmark-columns=median,mean,min,rounds
Smoke:  python -m pytest benchmarks/bench_scheduler.py --benchmark-disable
Goals on the 2-core CI machine: one 256-decode step (schedule + update) < 150 us;
prefix hashing of a 32k-token prompt < 2 ms; checking 256 token-id prompts of 1088 tokens
(``normalize_prompts``, what ``LLM.generate`` does first) < 10 ms.
"""
from __future__ import annotations

import random

import pytest

from engine.config import EngineConfig
from engine.hashing import extend_block_hashes
from engine.outputs import ModelRunnerOutput
from engine.prompts import normalize_prompts
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

pytestmark = pytest.mark.cpu

NUM_DECODES, PROMPT, ROUNDS = 256, 32, 2000
LONG_PROMPT = 32 * 1024


def _decoding_scheduler() -> tuple[Scheduler, ModelRunnerOutput]:
    """256 requests past their prefill, with room for ROUNDS more tokens each."""
    max_tokens = ROUNDS + 200
    cfg = EngineConfig(max_model_len=PROMPT + max_tokens, block_size=16, max_num_seqs=NUM_DECODES)
    sched = Scheduler(cfg, 1 + NUM_DECODES * -(-(PROMPT + max_tokens) // 16))
    rng = random.Random(0)
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    for i in range(NUM_DECODES):
        sched.add_request(Request(f"req-{i}", [rng.randrange(32000) for _ in range(PROMPT)], params,
                                  eos_token_ids=(2,)))
    so = sched.schedule()
    ids = [n.req_id for n in so.scheduled_new_reqs]
    out = ModelRunnerOutput(ids, [[rng.randrange(32000)] for _ in ids])
    sched.update_from_output(so, out)
    return sched, out


def test_bench_decode_step_256(benchmark) -> None:  # type: ignore[no-untyped-def]
    sched, out = _decoding_scheduler()

    def step() -> None:
        so = sched.schedule()
        sched.update_from_output(so, out)

    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=20)
    assert len(sched.running) == NUM_DECODES and sched.kv.num_free_blocks < sched.kv.num_blocks - 1
    so = sched.schedule()
    assert so.total_num_scheduled_tokens == NUM_DECODES and so.scheduled_cached_reqs.req_ids == out.req_ids


def test_bench_prefix_hash_32k(benchmark) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(0)
    prompt = [rng.randrange(150000) for _ in range(LONG_PROMPT)]
    params = SamplingParams()

    def fresh() -> tuple[tuple, dict]:
        return (Request("long", prompt, params),), {}

    hashes = benchmark.pedantic(lambda r: extend_block_hashes(r, 16, LONG_PROMPT), setup=fresh,
                                rounds=200, warmup_rounds=5)
    assert len(hashes) == LONG_PROMPT // 16 and len(set(hashes)) == len(hashes)


def test_bench_prefix_lookup_32k_cached(benchmark) -> None:  # type: ignore[no-untyped-def]
    """Admission of a 32k prompt whose prefix is cached: hashing + 2,048 lookups."""
    rng = random.Random(1)
    prompt = [rng.randrange(150000) for _ in range(LONG_PROMPT)]
    cfg = EngineConfig(max_model_len=LONG_PROMPT + 16, block_size=16, max_num_batched_tokens=LONG_PROMPT)
    sched = Scheduler(cfg, 1 + 2 * LONG_PROMPT // 16 + 2)
    sched.add_request(Request("warm", prompt, SamplingParams(max_tokens=1)))
    sched.schedule()
    params = SamplingParams()

    def fresh() -> tuple[tuple, dict]:
        return (Request("probe", prompt, params),), {}

    blocks, hit = benchmark.pedantic(sched.kv.get_computed_blocks, setup=fresh, rounds=100, warmup_rounds=3)
    assert hit == LONG_PROMPT - 16 and len(blocks) == LONG_PROMPT // 16 - 1


def test_bench_normalize_token_id_prompts(benchmark) -> None:  # type: ignore[no-untyped-def]
    """256 prompts of 1088 token ids (the shared-prefix workload's): every id is checked."""
    rng = random.Random(2)
    prompts = [[rng.randrange(128000) for _ in range(1088)] for _ in range(256)]
    out = benchmark.pedantic(normalize_prompts, args=(prompts,), rounds=20, warmup_rounds=2)
    assert out == prompts and out[0] is not prompts[0]  # copies, never the caller's lists
