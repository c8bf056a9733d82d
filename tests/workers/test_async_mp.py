"""Async scheduling through the multiprocess executor (two CPU ranks, gloo): the same outputs as
synchronous scheduling, step n+1 launched on every rank before step n is read back, handles
resolved in launch order, and failures of a rank during an async step named and cleaned up."""
import os
import pickle
import signal

import pytest

from engine import LLM, SamplingParams, WorkerError
from engine.outputs import CachedRequestData, SchedulerOutput
from tests.entrypoints.test_async_scheduling import SETTINGS, check_async_equals_sync
from tests.workers.test_executors import PROMPTS, TINY, _gone

pytestmark = pytest.mark.cpu

MP = dict(tensor_parallel_size=2, distributed_executor_backend="mp")
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
BAD = SchedulerOutput([], CachedRequestData(["nobody"], [False], [[]], [0]), {"nobody": 1}, 1)


@pytest.mark.parametrize("name", [n for n in SETTINGS if n != "one step"])  # chunks, few seats, preemption
def test_async_equals_sync_over_two_worker_processes(name):
    check_async_equals_sync(name, **MP)


def _add(llm: LLM, prompt: list[int]) -> None:
    llm.scheduler.add_request(llm._make_request(prompt, GREEDY))


def test_handles_resolve_in_launch_order_with_or_without_a_later_step():
    with LLM(async_scheduling=True, **MP, **TINY) as llm:
        ex, s = llm.executor, llm.scheduler
        _add(llm, PROMPTS[0])
        so1 = s.schedule()
        h1 = ex.execute_model_async(so1)
        so2 = s.schedule()  # one step ahead: the token of step 1 is a placeholder
        h2 = ex.execute_model_async(so2)
        seq = ex._seq
        out1 = h1.result()  # rank 0 read step 1 back because step 2 arrived: no "collect" was sent
        assert ex._seq == seq and out1.req_ids == [so1.scheduled_new_reqs[0].req_id]
        assert ex._call("steps_launched_ahead") == [1, 1]  # the call also reads step 2 back first
        out2 = h2.result()  # its reply came during the call and waited in the handle
        assert ex._seq == seq + 1 and h2.result() is out2 and len(out2.sampled_token_ids[0]) == 1
        s.update_from_output(so1, out1)
        s.update_from_output(so2, out2)
        so3 = s.schedule()
        out3 = ex.execute_model_async(so3).result()  # nothing after it: result() asks for it
        assert ex._seq == seq + 3 and len(out3.sampled_token_ids[0]) == 1
        s.update_from_output(so3, out3)


def _send_to_rank1_before(llm: LLM, monkeypatch, at_call: int, message: tuple) -> None:
    """Before the engine's ``at_call``-th async step, rank 1 alone receives ``message``."""
    ex, real, n = llm.executor, llm.executor.execute_model_async, [0]

    def launch(so):
        n[0] += 1
        if n[0] == at_call:
            ex._seq += 1
            ex._conns[1].send_bytes(pickle.dumps((ex._seq, *message)))
        return real(so)
    monkeypatch.setattr(ex, "execute_model_async", launch)


def test_a_rank_raising_in_an_async_step_is_named_and_everything_stops(monkeypatch):
    llm = LLM(async_scheduling=True, **MP, **TINY)
    pids = llm.executor.pids
    _send_to_rank1_before(llm, monkeypatch, 3, ("execute_model_async", (BAD,)))
    with pytest.raises(WorkerError, match=r"worker rank 1 raised during execute_model: KeyError: 'nobody'") as e:
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert e.value.rank == 1
    assert _gone(pids), "a worker outlived the failed async step"
    s = llm.scheduler
    assert not s.has_unfinished_requests() and s.kv.num_free_blocks == llm.num_kv_blocks - 1


def test_a_failed_launch_raises_at_result():
    llm = LLM(async_scheduling=True, **MP, **TINY)
    pids = llm.executor.pids
    handle = llm.executor.execute_model_async(BAD)  # returns at once; the ranks raise when they launch it
    with pytest.raises(WorkerError, match=r"worker rank \d raised during execute_model: KeyError: 'nobody'"):
        handle.result()
    assert _gone(pids)


def test_a_rank_dying_with_a_step_in_flight_is_named():
    llm = LLM(async_scheduling=True, **MP, **TINY)
    pids = llm.executor.pids
    _add(llm, PROMPTS[2])
    handle = llm.executor.execute_model_async(llm.scheduler.schedule())
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"worker rank 1 \(pid \d+\) died with exit code -9") as e:
        handle.result()
    assert e.value.rank == 1 and _gone(pids)


def test_shutdown_with_a_step_in_flight_leaves_no_process():
    llm = LLM(async_scheduling=True, **MP, **TINY)
    pids = llm.executor.pids
    _add(llm, PROMPTS[2])
    handle = llm.executor.execute_model_async(llm.scheduler.schedule())
    llm.shutdown()
    assert _gone(pids), "a worker outlived shutdown() with a step in flight"
    with pytest.raises(WorkerError, match="create a new engine"):
        handle.result()


@pytest.mark.parametrize("platform,tp,expected", [("cuda", 1, True), ("cuda", 2, True), ("cpu", 1, False),
                                                  ("cpu", 2, False)])
def test_auto_async_scheduling_is_on_for_cuda_at_any_tensor_parallel_size(platform, tp, expected):
    """``async_scheduling=None``: on where the workers run on CUDA (one rank or several, every
    executor overlaps), off on the CPU unless asked."""
    import dataclasses
    from unittest import mock

    from tests.entrypoints.fake_executor import FakeExecutor

    class Reporting(FakeExecutor):
        def initialize(self):
            return dataclasses.replace(super().initialize(), platform=platform, tensor_parallel_size=tp)

    with mock.patch("workers.get_executor_cls", lambda backend: Reporting):
        llm = LLM(num_kv_blocks=16, max_model_len=64, tensor_parallel_size=tp)
    assert llm.config.async_scheduling is expected and llm.scheduler.async_scheduling is expected


def test_ctrl_c_while_a_step_is_being_sent_waits_until_every_rank_has_it(monkeypatch):
    """A step that reached rank 0 but not rank 1 would leave rank 0's all-reduce waiting for good."""
    with LLM(async_scheduling=True, **MP, **TINY) as llm:
        ex, sent = llm.executor, []
        for rank, conn in enumerate(ex._conns):
            def send(data, real=conn.send_bytes, rank=rank):
                real(data)
                sent.append(rank)
                if rank == 0:
                    os.kill(os.getpid(), signal.SIGINT)
            monkeypatch.setattr(conn, "send_bytes", send)
        _add(llm, PROMPTS[0])
        try:
            with pytest.raises(KeyboardInterrupt):
                ex.execute_model_async(llm.scheduler.schedule())
        finally:
            monkeypatch.undo()
        assert sent == [0, 1]
        assert ex._call("steps_launched_ahead") == [0, 0]  # both ranks ran the step; neither waits
