"""The scheduler's abort path: abort_requests, a step that failed (discard_step), drain_finished,
and the block manager's commit of prefix-cache entries."""
from __future__ import annotations

import pytest

from engine.block_manager import KVBlockManager
from engine.outputs import ModelRunnerOutput
from engine.request import RequestStatus
from tests.engine.fake_runner import FakeRunner, check_kv
from tests.engine.test_scheduler import _req, _sched, _step

pytestmark = pytest.mark.cpu


def _whole(s) -> bool:
    check_kv(s.kv)
    return s.kv.num_free_blocks == s.kv.num_blocks - 1


def test_abort_requests_everywhere_and_report_them_once() -> None:
    s = _sched(num_blocks=9, max_num_seqs=2)
    runner = FakeRunner(s)
    for rid in ("run", "wait", "never"):
        s.add_request(_req(rid, 10, max_tokens=8, first=ord(rid[0])))
    _step(s, runner)
    _step(s, runner)
    assert [r.request_id for r in s.running] == ["run", "wait"] and s.get_request("never").num_cached_tokens < 0
    assert s.abort_requests(["run", "never", "unknown", "run"]) == ["run", "never"]
    assert s.abort_requests("run") == []  # already finished
    assert s.get_request("run").status is RequestStatus.FINISHED_ABORTED
    so, _ = _step(s, runner)
    assert so.finished_req_ids == {"run"}  # the runner never saw "never"
    assert "run" not in runner.state and runner.freed["run"] == 1
    s.abort_requests(["wait"])
    s.update_from_output(so, ModelRunnerOutput([], []))
    runner.execute(s.drain_finished())
    assert not runner.state and _whole(s) and not s.has_unfinished_requests()


def test_committed_prefix_blocks_stay_cached_after_an_abort() -> None:
    s = _sched(num_blocks=16)
    runner = FakeRunner(s)
    s.add_request(_req("a", 20, max_tokens=8))
    _step(s, runner)  # 20 prompt tokens: blocks 0..1 full and registered
    _step(s, runner)
    s.abort_requests("a")
    _step(s, runner)
    assert _whole(s) and s.kv.num_cached_blocks == 2
    s.add_request(_req("b", 20, max_tokens=3))
    so, _ = _step(s, runner)  # the fake runner reads back every position: a stale block would fail
    assert so.scheduled_new_reqs[0].num_computed_tokens == 16
    while s.has_unfinished_requests() or s.has_finished_requests():
        _step(s, runner)
    assert _whole(s)


def test_a_failed_step_forgets_its_cache_entries_and_aborts_its_requests() -> None:
    s = _sched(num_blocks=16)
    runner = FakeRunner(s, at_least_once=True)
    s.add_request(_req("a", 12, max_tokens=8))
    _step(s, runner)  # block 0 full, committed
    s.add_request(_req("b", 30, max_tokens=8, first=50))
    s.add_request(_req("w", 100, max_tokens=8, first=200))  # will not fit beside a and b: waits
    s.abort_requests("a")
    so = s.schedule()  # b's prefill registers blocks 0..2 of b; then the step "fails"
    assert so.finished_req_ids == {"a"} and "b" in so.num_scheduled_tokens and "w" not in so.num_scheduled_tokens
    cached_before = s.kv.num_cached_blocks
    assert s.discard_step() == ["b"]
    assert s.discard_step() == []  # nothing in flight any more
    assert s.kv.num_cached_blocks == cached_before - 3  # b's three full blocks: forgotten; a's block stays
    assert s.get_request("b").status is RequestStatus.FINISHED_ABORTED and s.has_unfinished_requests()
    so = s.schedule()
    assert so.finished_req_ids == {"a", "b"}  # a again: the failed step may not have delivered it
    assert [n.req_id for n in so.scheduled_new_reqs] == ["w"]
    s.update_from_output(so, runner.execute(so))  # b was never run: the runner drops nothing for it
    s.abort_requests("w")
    runner.execute(s.drain_finished())
    assert _whole(s) and not runner.state


def test_abort_finds_a_request_that_an_interrupt_left_in_no_queue() -> None:
    s = _sched()
    s.add_request(_req("x", 5))
    req = s.waiting.popleft()  # as if Ctrl-C struck between the two halves of a move
    assert req not in s.running
    assert s.abort_requests("x") == ["x"] and not s.has_unfinished_requests()


def test_check_request_changes_nothing() -> None:
    s = _sched(num_blocks=5)
    with pytest.raises(ValueError, match="num_kv_blocks=5"):
        s.check_request(_req("big", 30, max_tokens=20))
    s.check_request(_req("ok", 3))
    assert not s.has_unfinished_requests() and not s.waiting


def test_block_manager_commit_and_discard() -> None:
    kv = KVBlockManager(8, 4)
    a = _req("a", 9)
    kv.allocate_slots(a, 9, [])  # two full blocks registered
    kv.commit()
    a.num_computed_tokens = 9
    a.all_token_ids.extend([100, 101, 102])
    kv.allocate_slots(a, 3)  # the third block fills: registered, not yet committed
    assert kv.num_cached_blocks == 3
    kv.discard_uncommitted()
    assert kv.num_cached_blocks == 2
    kv.free(a)
    check_kv(kv)
    first_free = next(iter(kv._free))
    assert kv.block_hash[first_free] is None  # the forgotten block is reused first
