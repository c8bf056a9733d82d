"""Property test: generate calls interleaved with aborts and injected exceptions (Ctrl-C or
errors, before or after a step runs, or inside schedule()) on an LLM over a fake executor. After
every call the pool is whole and its invariants hold, nothing is left in the scheduler or the
runner, and no request is lost or duplicated."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine import SamplingParams
from tests.entrypoints.fake_executor import assert_whole, fake_llm

pytestmark = pytest.mark.cpu

MAX_MODEL_LEN = 64


class Injected(Exception):
    pass


@st.composite
def calls(draw: st.DrawFn) -> list[dict]:
    prefixes = [[], [1] * 16, draw(st.lists(st.integers(0, 7), min_size=8, max_size=24))]
    out = []
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 6))
        prompts = [draw(st.sampled_from(prefixes)) + draw(st.lists(st.integers(0, 7), min_size=1, max_size=16))
                   for _ in range(n)]
        fault = draw(st.none() | st.tuples(st.integers(1, 12), st.sampled_from(["before", "after", "schedule"]),
                                           st.sampled_from([KeyboardInterrupt, Injected])))
        aborts = draw(st.lists(st.tuples(st.integers(1, 12), st.integers(0, n - 1)), max_size=2))
        out.append(dict(prompts=prompts, max_tokens=[draw(st.integers(1, 12)) for _ in range(n)],
                        fault=fault, aborts=aborts))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls(), st.sampled_from([8, 16]), st.sampled_from([7, 16, 64]), st.integers(1, 4), st.integers(0, 3))
def test_calls_aborts_and_faults_keep_every_invariant(plan, block_size, budget, max_seqs, spare):
    worst = -(-(MAX_MODEL_LEN - 1) // block_size)
    llm = fake_llm(device="cpu", block_size=block_size, num_kv_blocks=1 + worst + spare, max_model_len=MAX_MODEL_LEN,
                   max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    seen: set[str] = set()
    num_ids = 0  # request ids are req-0, req-1, ... in prompt order, failed calls included
    for call in plan:
        fault, aborts = call["fault"], call["aborts"]
        ids: list[str] = []

        def hook(when, k, so, fault=fault, aborts=aborts, ids=ids):
            if when == "before":
                for at, i in aborts:
                    if at == k and i < len(ids):
                        llm.abort(ids[i])  # mid-step: applied at the step boundary
            if fault is not None and fault[0] == k and fault[1] == when:
                raise fault[2]("injected")
        llm.executor.hook = hook
        allocate, n_alloc = llm.scheduler.kv.allocate_slots, [0]
        if fault is not None and fault[1] == "schedule":
            def allocate_or_fail(*args, **kw):
                n_alloc[0] += 1
                if n_alloc[0] == fault[0]:
                    raise fault[2]("injected inside schedule()")
                return allocate(*args, **kw)
            llm.scheduler.kv.allocate_slots = allocate_or_fail
        ids.extend(f"req-{num_ids + i}" for i in range(len(call["prompts"])))
        num_ids += len(ids)
        params = [SamplingParams(max_tokens=m, ignore_eos=True) for m in call["max_tokens"]]
        try:
            outs = llm.generate(call["prompts"], params, use_tqdm=False)
        except (KeyboardInterrupt, Injected):
            event("call failed")
            outs = None
        finally:
            llm.scheduler.kv.allocate_slots = allocate
        assert_whole(llm)
        if outs is None:
            continue
        assert [o.request_id for o in outs] == ids and not set(ids) & seen, "lost, reordered or duplicated"
        seen.update(ids)
        for o, p, m in zip(outs, call["prompts"], call["max_tokens"]):
            comp = o.outputs[0]
            assert o.finished and o.prompt_token_ids == p
            if comp.finish_reason == "abort":
                event("aborted")
                assert len(comp.token_ids) < m
            else:
                assert comp.finish_reason == "length" and len(comp.token_ids) == m
