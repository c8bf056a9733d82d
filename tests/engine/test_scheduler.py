from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from tests.engine.fake_runner import FakeRunner, check_step, drive

pytestmark = pytest.mark.cpu


def _sched(num_blocks: int = 64, **kw: object) -> Scheduler:
    kw.setdefault("max_model_len", 128)
    kw.setdefault("block_size", 8)
    return Scheduler(EngineConfig(**kw), num_blocks)  # type: ignore[arg-type]


def _req(rid: str, n: int, max_tokens: int = 4, first: int = 0, **kw: object) -> Request:
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   **kw)  # type: ignore[arg-type]


def _step(s: Scheduler, runner: FakeRunner) -> tuple[SchedulerOutput, list[Request]]:
    so = s.schedule()
    check_step(s, so)
    return so, s.update_from_output(so, runner.execute(so))


def test_add_request_rejections_name_the_numbers() -> None:
    s = _sched(num_blocks=5)
    with pytest.raises(ValueError, match=r"129 tokens.*max_model_len=128"):
        s.add_request(_req("long", 129))
    with pytest.raises(ValueError, match=r"max_model_len=128.*7 KV blocks of block_size=8.*num_kv_blocks=5"):
        s.add_request(_req("big", 30, max_tokens=20))  # up to 49 slots = 7 blocks > 4
    s.add_request(_req("ok", 30, max_tokens=3))  # 32 slots = 4 blocks: fits exactly
    with pytest.raises(ValueError, match="already"):
        s.add_request(_req("ok", 3))
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(EngineConfig(), 10)


def test_chunked_prefill_mixes_with_decodes_under_one_budget() -> None:
    s = _sched(max_num_batched_tokens=10)
    runner = FakeRunner(s)
    s.add_request(_req("a", 3, max_tokens=10))
    so, _ = _step(s, runner)
    assert so.num_scheduled_tokens == {"a": 3} and s.get_request("a").num_output_tokens == 1
    s.add_request(_req("b", 25, first=100))
    so, _ = _step(s, runner)  # a decodes first, b gets the other 9 tokens
    assert so.num_scheduled_tokens == {"a": 1, "b": 9} and so.total_num_scheduled_tokens == 10
    assert [n.req_id for n in so.scheduled_new_reqs] == ["b"] and so.scheduled_cached_reqs.req_ids == ["a"]
    b = s.get_request("b")
    assert b.num_computed_tokens == 9 and b.num_output_tokens == 0  # partial prefill: no token
    so, _ = _step(s, runner)
    assert so.num_scheduled_tokens == {"a": 1, "b": 9}
    assert so.scheduled_cached_reqs.num_computed_tokens == [4, 9]  # where each step starts
    so, _ = _step(s, runner)
    assert so.num_scheduled_tokens == {"a": 1, "b": 7} and b.num_output_tokens == 1


def test_long_prefill_threshold_caps_one_request_share() -> None:
    s = _sched(max_num_batched_tokens=64, long_prefill_token_threshold=6)
    runner = FakeRunner(s)
    s.add_request(_req("a", 20))
    s.add_request(_req("b", 4))
    so, _ = _step(s, runner)
    assert so.num_scheduled_tokens == {"a": 6, "b": 4}


def test_max_num_seqs_caps_running_and_fcfs_order() -> None:
    s = _sched(max_num_seqs=2)
    runner = FakeRunner(s)
    for i in range(4):
        s.add_request(_req(f"r{i}", 5, first=10 * i))
    so, _ = _step(s, runner)
    assert [n.req_id for n in so.scheduled_new_reqs] == ["r0", "r1"] and len(s.waiting) == 2
    assert drive(s, runner, {}, {}) == {f"r{i}": 1 for i in range(4)}


def test_generation_stops_at_max_model_len() -> None:
    s = _sched(max_model_len=12)
    runner = FakeRunner(s)
    s.add_request(_req("a", 10, max_tokens=100))
    s.add_request(_req("b", 12, max_tokens=100, first=50))  # prompt == max_model_len: one token
    drive(s, runner, {}, {})
    a, b = runner.history["a"], runner.history["b"]
    assert len(a) == 12 and len(b) == 13


def test_finish_status_and_finished_ids_reach_the_runner_once() -> None:
    s = _sched()
    runner = FakeRunner(s)
    s.add_request(_req("a", 5, max_tokens=2))
    _, fin = _step(s, runner)
    assert fin == []
    _, fin = _step(s, runner)
    assert [r.request_id for r in fin] == ["a"] and fin[0].status is RequestStatus.FINISHED_LENGTH
    assert s.get_request("a") is fin[0] and not s.has_unfinished_requests() and s.has_finished_requests()
    so = s.schedule()
    assert so.finished_req_ids == {"a"} and s.get_request("a") is None
    assert s.schedule().finished_req_ids == set()
    assert s.kv.num_free_blocks == s.kv.num_blocks - 1


def test_aborts_running_and_waiting() -> None:
    s = _sched(max_num_seqs=1)
    runner = FakeRunner(s)
    s.add_request(_req("a", 5, max_tokens=50))
    s.add_request(_req("b", 5, first=20))
    so, _ = _step(s, runner)
    s.finish_requests("b", RequestStatus.FINISHED_ABORTED)  # never scheduled: the runner never knew it
    s.finish_requests(["a", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert s.get_request("a").status.finish_reason == "abort"
    so = s.schedule()
    assert so.finished_req_ids == {"a"} and so.total_num_scheduled_tokens == 0
    assert s.kv.num_free_blocks == s.kv.num_blocks - 1 and s.num_finished == 2
    with pytest.raises(ValueError, match="finished status"):
        s.finish_requests("x", RequestStatus.RUNNING)


def test_rows_of_requests_aborted_mid_step_are_ignored() -> None:
    s = _sched()
    runner = FakeRunner(s)
    s.add_request(_req("a", 5, max_tokens=50))
    so = s.schedule()
    out = runner.execute(so)
    s.finish_requests("a", RequestStatus.FINISHED_ABORTED)
    assert s.update_from_output(so, out) == [] and s.get_request("a").num_output_tokens == 0


def test_a_completed_prefill_without_a_token_is_an_error() -> None:
    s = _sched()
    s.add_request(_req("a", 5))
    so = s.schedule()
    with pytest.raises(RuntimeError, match="sampled no token"):
        s.update_from_output(so, ModelRunnerOutput(["a"], [[]]))


def test_preemption_newest_first_resumes_as_cached_with_whole_table() -> None:
    # 8 usable blocks of 8: a and b each grow to 4 blocks; c can't fit beside them.
    s = _sched(num_blocks=9, enable_prefix_caching=False)
    runner = FakeRunner(s)
    s.add_request(_req("a", 16, max_tokens=16))
    s.add_request(_req("b", 16, max_tokens=16, first=100))
    s.add_request(_req("c", 16, max_tokens=16, first=200))
    seen_preempt = None
    for _ in range(200):
        so, _ = _step(s, runner)
        if so.preempted_req_ids:
            seen_preempt = so
            break
    assert seen_preempt is not None and seen_preempt.preempted_req_ids == {"c"}
    c = s.get_request("c")
    assert c.status is RequestStatus.PREEMPTED and s.waiting[0] is c and c.num_computed_tokens == 0
    generated = c.num_output_tokens
    so = None
    while c.status is not RequestStatus.RUNNING:
        so, _ = _step(s, runner)
    assert "c" in so.scheduled_cached_reqs.req_ids and "c" not in [n.req_id for n in so.scheduled_new_reqs]
    i = so.scheduled_cached_reqs.req_ids.index("c")
    assert so.scheduled_cached_reqs.resumed_from_preemption[i]
    assert so.scheduled_cached_reqs.new_block_ids[i] == s.kv.get_block_ids(c)
    assert so.scheduled_cached_reqs.num_computed_tokens[i] == 0
    assert so.num_scheduled_tokens["c"] == 16 + generated  # recomputes prompt + its token
    assert c.num_output_tokens == generated + 1  # nothing lost while parked, the next one sampled
    drive(s, runner, {}, {})
    assert runner.history["c"] == c.all_token_ids and c.num_output_tokens == 16
    assert s.num_preemptions >= 1 and c.num_preemptions >= 1


def test_resumed_request_reuses_its_cached_blocks() -> None:
    s = _sched(num_blocks=9)  # a and b need 3 blocks each, so c's cached prompt survives
    runner = FakeRunner(s)
    s.add_request(_req("a", 16, max_tokens=8))
    s.add_request(_req("b", 16, max_tokens=8, first=100))
    s.add_request(_req("c", 16, max_tokens=16, first=200))
    for _ in range(200):
        so, _ = _step(s, runner)
        if so.preempted_req_ids:
            break
    c = s.get_request("c")
    while c.status is not RequestStatus.RUNNING:
        so, _ = _step(s, runner)
    i = so.scheduled_cached_reqs.req_ids.index("c")
    assert so.scheduled_cached_reqs.num_computed_tokens[i] > 0  # its full blocks were still cached
    assert c.num_cached_tokens == 0  # reported hits are those of the first scheduling


def test_prefix_sharing_workload_hits() -> None:
    s = _sched(num_blocks=200, block_size=16, max_model_len=256)
    runner = FakeRunner(s)
    prefix = list(range(1000, 1096))
    reqs = [Request(f"r{i}", prefix + [i] * 10, SamplingParams(max_tokens=8, ignore_eos=True))
            for i in range(10)]
    drive(s, runner, {0: reqs}, {})
    assert [r.num_cached_tokens for r in reqs] == [0] + [96] * 9
    st = s.stats()
    assert st.prefix_cache_hits == 9 * 96 and st.prefix_cache_queries == 10 * 106
    assert st.prefix_cache_hit_rate == pytest.approx(864 / 1060) and st.num_finished == 10
    assert all(runner.history[r.request_id] == r.all_token_ids for r in reqs)


def test_scheduler_modules_import_no_torch() -> None:
    """Our modules alone (the package __init__ is bypassed: it is not ours to test here)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, types; m = types.ModuleType('engine'); m.__path__ = ['engine']; "
            "sys.modules['engine'] = m; import engine.scheduler, engine.block_manager, engine.hashing; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])
