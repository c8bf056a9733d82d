"""Ctrl-C and exceptions inside ``LLM.generate`` (a real model on the CPU): the exception
propagates, the call's requests are dropped everywhere, the KV pool is whole again, and the
next call gives exactly a fresh object's outputs (greedy and seeded requests)."""
from __future__ import annotations

import signal
import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine.detokenizer import IncrementalDetokenizer
from engine.executor import WorkerError
from tests.engine.fake_runner import check_kv

pytestmark = pytest.mark.cpu

# A tight pool (13 usable blocks of 16 for six requests of up to 4 blocks) forces preemption;
# 48-token steps chunk every prefill.
ENGINE = dict(device="cpu", dtype="float32", block_size=16, num_kv_blocks=14, max_num_batched_tokens=48,
              max_num_seqs=4, max_model_len=256)


def _prompts() -> list:
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(0, 256, (40,), generator=g).tolist()  # a prefix shared by three prompts
    return [shared + [1, 2, 3], "Once upon a time, in a land far away,", shared + [9] * 9,
            torch.randint(0, 256, (30,), generator=g).tolist(), shared, "The capital of France is"]


PARAMS = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
          SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)] * 3


def _view(outs) -> list:
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs]


@pytest.fixture(scope="module")
def reference() -> list:
    return _view(LLM(**ENGINE).generate(_prompts(), PARAMS, use_tqdm=False))


@pytest.fixture(scope="module")
def shared_llm() -> LLM:
    return LLM(**ENGINE)  # the one object every test interrupts, then uses again


@pytest.fixture
def llm(shared_llm: LLM) -> LLM:
    assert shared_llm.scheduler.reset_prefix_cache()  # every test starts with full prefills
    return shared_llm


def assert_whole(llm: LLM) -> None:
    """Nothing of an interrupted call is left: scheduler, pool, runner."""
    s, r = llm.scheduler, llm.runner
    check_kv(s.kv)
    assert not s.has_unfinished_requests() and not s.waiting and not s.running
    assert s.kv.num_free_blocks == llm.num_kv_blocks - 1, "KV blocks leaked"
    assert not r.requests and r.input_batch.num_active == 0 and not r.sampling_state.active.any()


def ctrl_c_now() -> None:
    """Ctrl-C delivered here by a signal timer: arm it, then spin until it lands."""
    signal.setitimer(signal.ITIMER_REAL, 0.002)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pass
    raise AssertionError("the timer's signal never arrived")


@pytest.fixture(autouse=True)
def sigalrm_is_ctrl_c():
    old = signal.signal(signal.SIGALRM, signal.default_int_handler)  # raises KeyboardInterrupt, as SIGINT does
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, old)


def _on_forward(llm: LLM, want):
    """Interrupt inside the model's forward on the first step for which ``want(md)`` holds."""
    def hook(module, args):
        if want(args[3]):
            handle.remove()
            ctrl_c_now()
    handle = llm.runner.model.register_forward_pre_hook(hook)
    return handle.remove


def _on_detokenize(monkeypatch, k: int):
    calls = iter(range(10**6))
    real = IncrementalDetokenizer.update

    def update(self, tokens):
        if next(calls) == k:
            ctrl_c_now()
        return real(self, tokens)
    monkeypatch.setattr(IncrementalDetokenizer, "update", update)
    return lambda: monkeypatch.setattr(IncrementalDetokenizer, "update", real)


def _in_block_manager(llm: LLM, k: int):
    """Ctrl-C inside the block manager's allocation, after the k-th block's count was set but
    before the request's table holds it (the interrupt the pool must survive)."""
    kv, calls = llm.scheduler.kv, iter(range(10**6))
    real = kv._take_free_block

    def take() -> int:
        b = real()
        if next(calls) == k:
            raise KeyboardInterrupt
        return b
    kv._take_free_block = take
    return lambda: delattr(kv, "_take_free_block")


POINTS = {
    "first prefill step": lambda llm, mp: _on_forward(llm, lambda md: md.max_query_len > 1),
    "a later prefill chunk": lambda llm, mp: _on_forward(llm, lambda md, n=iter(range(99)): md.max_query_len > 1
                                                         and next(n) == 2),
    "decode": lambda llm, mp: _on_forward(llm, lambda md, n=iter(range(99)): md.is_pure_decode and next(n) == 4),
    "detokenization": lambda llm, mp: _on_detokenize(mp, 20),
    "the block manager, admitting": lambda llm, mp: _in_block_manager(llm, 0),
    "the block manager, growing a request": lambda llm, mp: _in_block_manager(llm, 9),
}


@pytest.mark.parametrize("point", POINTS)
def test_ctrl_c_at_a_point_then_the_next_call_is_a_fresh_objects(llm, reference, point, monkeypatch):
    undo = POINTS[point](llm, monkeypatch)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(_prompts(), PARAMS, use_tqdm=False)
    finally:
        undo()
    assert_whole(llm)
    assert _view(llm.generate(_prompts(), PARAMS, use_tqdm=False)) == reference
    assert_whole(llm)


@pytest.mark.parametrize("delay", [0.001, 0.004, 0.016, 0.05])
def test_ctrl_c_wherever_a_timer_lands(llm, reference, delay):
    signal.setitimer(signal.ITIMER_REAL, delay)
    try:
        outs = llm.generate(_prompts(), PARAMS, use_tqdm=False)
        signal.setitimer(signal.ITIMER_REAL, 0)
        assert _view(outs) == reference  # finished before the timer: nothing to recover
    except KeyboardInterrupt:
        pass
    assert_whole(llm)
    assert _view(llm.generate(_prompts(), PARAMS, use_tqdm=False)) == reference


def _fail_at_step(monkeypatch, llm: LLM, k: int, exc: BaseException, after: bool = False) -> list[int]:
    """The executor raises ``exc`` on its k-th call (before or after running the step)."""
    calls, real = [], llm.executor.execute_model

    def execute(so):
        calls.append(len(calls))
        if len(calls) == k and not after:
            raise exc
        out = real(so)
        if len(calls) == k:
            raise exc
        return out
    monkeypatch.setattr(llm.executor, "execute_model", execute)
    return calls


@pytest.mark.parametrize("k, after", [(1, False), (5, True), (9, False)])
def test_an_exception_mid_step_propagates_and_is_recovered(llm, reference, monkeypatch, k, after):
    calls = _fail_at_step(monkeypatch, llm, k, RuntimeError("device fell off the bus"), after)
    with pytest.raises(RuntimeError, match="fell off the bus"):
        llm.generate(_prompts(), PARAMS, use_tqdm=False)
    assert len(calls) == k + 1  # one more call: the runner was told to drop the call's requests
    assert_whole(llm)
    assert _view(llm.generate(_prompts(), PARAMS, use_tqdm=False)) == reference


def test_a_worker_error_is_not_followed_by_a_flush(llm, reference, monkeypatch):
    calls = _fail_at_step(monkeypatch, llm, 4, WorkerError("worker rank 0 died", 0))
    with pytest.raises(WorkerError):
        llm.generate(_prompts(), PARAMS, use_tqdm=False)
    assert len(calls) == 4  # a dead executor is not called again
    s = llm.scheduler
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == llm.num_kv_blocks - 1
    monkeypatch.undo()  # this executor is in fact alive: the next step tells its runner
    assert _view(llm.generate(_prompts(), PARAMS, use_tqdm=False)) == reference
    assert_whole(llm)


def test_abort_during_a_generate(llm, reference, monkeypatch):
    real, victims = llm.executor.execute_model, []

    def execute(so):
        if not victims and len(llm.scheduler.running) >= 2:
            victims.append(llm.scheduler.running[1].request_id)
            assert llm.abort(victims) == []  # deferred to the step boundary
        return real(so)
    monkeypatch.setattr(llm.executor, "execute_model", execute)
    outs = llm.generate(_prompts(), PARAMS, use_tqdm=False)
    monkeypatch.undo()
    got = _view(outs)
    i = [o.request_id for o in outs].index(victims[0])
    assert got[i][2] == "abort" and outs[i].finished
    assert got[i][0] == reference[i][0][:len(got[i][0])]  # what it had generated is still right
    assert got[:i] + got[i + 1:] == reference[:i] + reference[i + 1:]
    assert_whole(llm)
    assert llm.abort(victims + ["req-unknown"]) == []  # finished or unknown: ignored


def test_prefix_cache_survives_an_interrupt(llm, reference):
    undo = _on_forward(llm, lambda md, n=iter(range(99)): md.is_pure_decode and next(n) == 2)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(_prompts(), PARAMS, use_tqdm=False)
    finally:
        undo()
    outs = llm.generate(_prompts(), PARAMS, use_tqdm=False)
    assert _view(outs) == reference
    assert sum(o.num_cached_tokens for o in outs) > 0  # blocks completed before the interrupt were hit
