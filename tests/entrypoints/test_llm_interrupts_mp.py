"""Ctrl-C and a dead worker with the multiprocess executor, with synchronous and async scheduling:
the engine process is interrupted while it waits for the worker; the worker's late reply is
discarded and the abort reaches it. A worker that dies is a WorkerError, and nothing more is
sent to the dead executor."""
from __future__ import annotations

import os
import signal

import pytest

from engine import LLM, SamplingParams
from engine.executor import WorkerError
from tests.engine.fake_runner import check_kv

pytestmark = pytest.mark.cpu

ENGINE = dict(device="cpu", dtype="float32", block_size=16, num_kv_blocks=40, max_num_batched_tokens=256,
              max_model_len=512)
PROMPTS = [[(7 * i + j) % 256 for j in range(200)] for i in range(3)]  # prefills of a few ms each
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def mp_llm(request):
    llm = LLM(distributed_executor_backend="mp", async_scheduling=request.param, **ENGINE)
    yield llm
    llm.shutdown()


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _spy(monkeypatch, llm, at_call: int, action) -> None:
    """``action()`` as the engine sends its ``at_call``-th step."""
    name = "execute_model_async" if llm.config.async_scheduling else "execute_model"
    real, n = getattr(llm.executor, name), [0]

    def execute(so):
        n[0] += 1
        if n[0] == at_call:
            action()
        return real(so)
    monkeypatch.setattr(llm.executor, name, execute)


def test_ctrl_c_while_waiting_for_the_worker(mp_llm, monkeypatch):
    reference = _tokens(mp_llm.generate(PROMPTS, GREEDY, use_tqdm=False))
    old = signal.signal(signal.SIGALRM, signal.default_int_handler)
    try:
        _spy(monkeypatch, mp_llm, 1, lambda: signal.setitimer(signal.ITIMER_REAL, 0.001))
        with pytest.raises(KeyboardInterrupt):
            mp_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    monkeypatch.undo()
    check_kv(mp_llm.scheduler.kv)
    assert mp_llm.scheduler.kv.num_free_blocks == mp_llm.num_kv_blocks - 1
    assert not mp_llm.scheduler.has_unfinished_requests()
    assert _tokens(mp_llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == reference


def test_a_dead_worker_is_a_worker_error_and_not_called_again(mp_llm, monkeypatch):
    pid = mp_llm.executor.pids[0]
    _spy(monkeypatch, mp_llm, 2, lambda: os.kill(pid, signal.SIGKILL))
    with pytest.raises(WorkerError, match=r"worker rank 0 \(pid \d+\) (died|closed its pipe)"):
        mp_llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    s = mp_llm.scheduler
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == mp_llm.num_kv_blocks - 1
    monkeypatch.undo()
    with pytest.raises(WorkerError, match="the workers are gone"):
        mp_llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)
