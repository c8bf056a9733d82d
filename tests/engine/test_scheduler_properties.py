"""Property tests: random request streams through the scheduler and a fake runner."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine.config import EngineConfig
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from tests.engine.fake_runner import FakeRunner, drive

pytestmark = pytest.mark.cpu

MAX_MODEL_LEN = 96


@st.composite
def workloads(draw: st.DrawFn) -> tuple:
    block_size = draw(st.sampled_from([8, 16]))
    tokens = st.lists(st.integers(0, 7), min_size=1, max_size=30)
    prefixes = [[], [3] * 16] + [draw(st.lists(st.integers(0, 7), min_size=8, max_size=40)) for _ in range(2)]
    tails = [draw(tokens) for _ in range(2)] + [[1] * 16]  # repeated tails: whole prompts cached
    n = draw(st.integers(2, 12))
    reqs, worst = [], 0
    for i in range(n):
        prompt = draw(st.sampled_from(prefixes)) + draw(st.one_of(st.sampled_from(tails), tokens))
        prompt = prompt[:MAX_MODEL_LEN]
        params = SamplingParams(max_tokens=draw(st.integers(1, 32)), ignore_eos=draw(st.booleans()),
                                stop_token_ids=draw(st.sampled_from([[], [5]])))
        reqs.append((draw(st.integers(0, 4)), Request(f"r{i}", prompt, params, eos_token_ids=(7,),
                                                      cache_salt=draw(st.sampled_from([None, None, "s"])))))
        final = min(len(prompt) + params.max_tokens, max(MAX_MODEL_LEN, len(prompt) + 1))
        worst = max(worst, -(-(final - 1) // block_size))
    cfg = EngineConfig(max_model_len=MAX_MODEL_LEN, block_size=block_size,
                       max_num_batched_tokens=draw(st.sampled_from([1, 3, 7, 16, 64, 512])),
                       max_num_seqs=draw(st.integers(1, 8)),
                       long_prefill_token_threshold=draw(st.sampled_from([0, 0, 5, 16])),
                       enable_prefix_caching=draw(st.sampled_from([True, True, False])))
    num_blocks = 1 + worst + draw(st.sampled_from([0, 1, 2, 4, 12]))  # tiny pools force preemption
    aborts: dict[int, list[str]] = {}
    for _ in range(draw(st.integers(0, 4))):
        aborts.setdefault(draw(st.integers(0, 60)), []).append(f"r{draw(st.integers(0, n - 1))}")
    return cfg, num_blocks, reqs, aborts, draw(st.integers(0, 2**16))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_streams_keep_every_invariant(w: tuple) -> None:
    cfg, num_blocks, reqs, aborts, seed = w
    sched = Scheduler(cfg, num_blocks)
    runner = FakeRunner(sched, seed=seed)
    arrivals: dict[int, list[Request]] = {}
    for step, req in reqs:
        arrivals.setdefault(step, []).append(req)
    ended = drive(sched, runner, arrivals, aborts)

    event(f"preemptions: {min(sched.num_preemptions, 3)}")
    event(f"prefix hits: {sched.kv.num_hit_tokens > 0}")
    assert sorted(ended) == sorted(r.request_id for _, r in reqs) and set(ended.values()) == {1}
    assert sched.num_finished == len(reqs)
    for _, req in reqs:
        sp = req.sampling_params
        assert req.status.finished and req.num_output_tokens <= sp.max_tokens
        if req.status is RequestStatus.FINISHED_ABORTED:
            continue
        # Every sampled token arrived, once, in order, across any preemption.
        assert runner.history[req.request_id] == req.all_token_ids
        last = req.output_token_ids[-1]
        if req.status is RequestStatus.FINISHED_STOPPED:
            assert last in sp.stop_token_ids or (not sp.ignore_eos and last == 7)
        else:
            assert req.num_output_tokens == sp.max_tokens or req.num_tokens >= MAX_MODEL_LEN
        assert 0 <= req.num_cached_tokens < req.num_prompt_tokens
    if not cfg.enable_prefix_caching:
        assert sched.kv.num_hit_tokens == 0


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([2, 3, 5]))
def test_tiny_pool_preempts_and_resumes_without_losing_tokens(seed: int, spare: int) -> None:
    cfg = EngineConfig(max_model_len=64, block_size=8, max_num_batched_tokens=32, max_num_seqs=6)
    sched = Scheduler(cfg, num_kv_blocks=1 + 5 + spare)
    runner = FakeRunner(sched, seed=seed)
    reqs = [Request(f"r{i}", [i % 8] * (9 + 3 * i), SamplingParams(max_tokens=24, ignore_eos=True))
            for i in range(6)]
    ended = drive(sched, runner, {0: reqs}, {})
    assert sched.num_preemptions > 0
    assert set(ended.values()) == {1} and len(ended) == 6
    for req in reqs:
        assert req.num_output_tokens == 24
        assert runner.history[req.request_id] == req.all_token_ids
    assert any(r.num_preemptions for r in reqs)
