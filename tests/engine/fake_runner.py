"""A fake model runner for scheduler tests, and the invariants every step must keep.

The fake runner mirrors the real one's bookkeeping (it keeps tokens of preempted
requests, replaces the block table of resumed ones) and simulates the paged KV cache:
the "KV" written at position ``p`` is an identity of the request's salt and tokens
``[0, p]``. Every step writes the new positions (each slot at most once per fresh
allocation of its block), then reads back every position each request attends to, so a
wrong prefix hit, a lost token or a block overwritten under another request fails.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from engine.block_manager import KVBlockManager
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from engine.request import RequestStatus
from engine.scheduler import Scheduler


@dataclass
class _State:
    tokens: list[int]
    idents: list[int]
    table: list[int]
    computed: int
    active: bool = True

    def ident(self, p: int) -> int:
        while len(self.idents) <= p + 1:  # idents[q + 1]: identity of tokens [0, q]
            self.idents.append(hash((self.idents[-1], self.tokens[len(self.idents) - 1])))
        return self.idents[p + 1]


@dataclass
class FakeRunner:
    sched: Scheduler
    seed: int = 0
    vocab: int = 8
    state: dict[str, _State] = field(default_factory=dict)
    slots: dict[int, int] = field(default_factory=dict)  # slot -> identity written there
    freed: Counter = field(default_factory=Counter)  # finished ids received
    history: dict[str, list[int]] = field(default_factory=dict)  # tokens of freed requests
    # After a failed step finished ids are sent again, or for requests whose step never ran: the
    # real runner's _drop ignores ids it does not hold. Strict (False) everywhere else.
    at_least_once: bool = False

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        kv = self.sched.kv
        take = kv._take_free_block

        def take_and_wipe() -> int:  # a fresh block starts unwritten
            b = take()
            for s in range(b * kv.block_size, (b + 1) * kv.block_size):
                self.slots.pop(s, None)
            return b

        kv._take_free_block = take_and_wipe  # type: ignore[method-assign]

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        bs = self.sched.block_size
        for rid in so.finished_req_ids:
            if self.at_least_once and rid not in self.state:
                continue
            self.history[rid] = self.state.pop(rid).tokens
            self.freed[rid] += 1
        for rid in so.preempted_req_ids:
            assert self.state[rid].active, f"{rid} preempted twice"
            self.state[rid].active = False
        for new in so.scheduled_new_reqs:
            assert new.req_id not in self.state and new.req_id not in self.history
            req = self.sched.get_request(new.req_id)
            assert new.prompt_token_ids == req.prompt_token_ids
            assert new.num_computed_tokens == req.num_cached_tokens
            root = hash(("salt", req.cache_salt))
            self.state[new.req_id] = _State(list(new.prompt_token_ids), [root], list(new.block_ids),
                                            new.num_computed_tokens)
        c = so.scheduled_cached_reqs
        for rid, resumed, blocks, computed in zip(c.req_ids, c.resumed_from_preemption,
                                                  c.new_block_ids, c.num_computed_tokens):
            st = self.state[rid]
            assert st.active != resumed, f"{rid}: resumed={resumed} but active={st.active}"
            if resumed:
                st.table, st.active = list(blocks), True
            else:
                assert computed == st.computed, (rid, computed, st.computed)
                st.table.extend(blocks)
            st.computed = computed
        order = c.req_ids + [n.req_id for n in so.scheduled_new_reqs]
        assert len(set(order)) == len(order) and set(order) == set(so.num_scheduled_tokens)
        assert not set(order) & so.preempted_req_ids
        # Attention order: every new token's KV is written, then every position is read.
        for rid in order:
            st, n = self.state[rid], so.num_scheduled_tokens[rid]
            assert n > 0 and st.computed + n <= len(st.tokens), (rid, st.computed, n, len(st.tokens))
            for p in range(st.computed, st.computed + n):
                slot = st.table[p // bs] * bs + p % bs
                assert st.table[p // bs] != 0, "the null block was written"
                assert slot not in self.slots, f"{rid}: slot {slot} written twice"
                self.slots[slot] = st.ident(p)
        sampled: list[list[int]] = []
        for rid in order:
            st, n = self.state[rid], so.num_scheduled_tokens[rid]
            end = st.computed + n
            for p in range(end):
                slot = st.table[p // bs] * bs + p % bs
                assert self.slots.get(slot) == st.ident(p), f"{rid}: wrong KV at position {p}"
            st.computed = end
            if end == len(st.tokens):
                st.tokens.append(self.rng.randrange(self.vocab))
                sampled.append([st.tokens[-1]])
            else:
                sampled.append([])
        return ModelRunnerOutput(order, sampled)


def check_kv(kv: KVBlockManager) -> None:
    """Reference counts match the tables, never negative; the free queue is the rest."""
    holders = Counter(b for table in (h.table for h in kv._held.values()) for b in table)
    assert 0 not in holders, "the null block was allocated"
    assert all(r >= 0 for r in kv.ref_cnt)
    for b in range(1, kv.num_blocks):
        assert kv.ref_cnt[b] == holders.get(b, 0), (b, kv.ref_cnt[b], holders.get(b, 0))
        assert (b in kv._free) == (kv.ref_cnt[b] == 0)
    assert 0 not in kv._free and len(kv._free) == kv.num_blocks - 1 - len(holders)
    for h, b in kv._cached.items():
        assert kv.block_hash[b] == h


def check_step(sched: Scheduler, so: SchedulerOutput) -> None:
    """What must hold right after schedule()."""
    cfg, kv, bs = sched.config, sched.kv, sched.block_size
    check_kv(kv)
    assert so.total_num_scheduled_tokens == sum(so.num_scheduled_tokens.values())
    assert so.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
    if cfg.long_prefill_token_threshold:
        assert all(n <= max(cfg.long_prefill_token_threshold, 1) for n in so.num_scheduled_tokens.values())
    assert len(sched.running) <= cfg.max_num_seqs
    assert set(kv._held) <= {r.request_id for r in sched.running}
    assert all(r.status is RequestStatus.RUNNING for r in sched.running)
    assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in sched.waiting)
    assert not (so.preempted_req_ids & set(so.num_scheduled_tokens))
    if so.preempted_req_ids:
        assert not so.scheduled_new_reqs and not any(so.scheduled_cached_reqs.resumed_from_preemption)
    # A block held by two running requests is a cached full block that at most one writes.
    writers: dict[int, list[str]] = {}
    holders: dict[int, int] = Counter()
    for req in sched.running:
        table = kv.get_block_ids(req)
        assert req.num_computed_tokens <= len(table) * bs and req.num_computed_tokens <= req.num_tokens
        n = so.num_scheduled_tokens.get(req.request_id, 0)
        start = req.num_computed_tokens - n
        for i, b in enumerate(table):
            holders[b] += 1
            if start < (i + 1) * bs and req.num_computed_tokens > i * bs:
                writers.setdefault(b, []).append(req.request_id)
    for b, count in holders.items():
        assert len(writers.get(b, [])) <= 1, f"block {b} written by {writers[b]}"
        if count > 1:
            assert kv.block_hash[b] is not None, f"block {b} shared but not a cached full block"


def drive(sched: Scheduler, runner: FakeRunner, arrivals: dict[int, list], aborts: dict[int, list[str]],
          max_steps: int = 5000) -> dict[str, int]:
    """Run to completion: ``arrivals[step]`` requests are added and ``aborts[step]`` ids
    aborted before that step's schedule(). Returns how often each request ended."""
    ended: Counter = Counter()
    step = 0
    while (step <= max(arrivals, default=0) or sched.has_unfinished_requests()
           or sched.has_finished_requests()):
        assert step < max_steps, "no progress"
        for req in arrivals.get(step, []):
            sched.add_request(req)
        for rid in aborts.get(step, []):
            req = sched.get_request(rid)
            if req is not None and not req.status.finished:
                sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
                assert req.status is RequestStatus.FINISHED_ABORTED
                ended[rid] += 1
        so = sched.schedule()
        check_step(sched, so)
        out = runner.execute(so)
        for req in sched.update_from_output(so, out):
            assert req.status.finished
            ended[req.request_id] += 1
        step += 1
    check_kv(sched.kv)
    assert sched.kv.num_free_blocks == sched.kv.num_blocks - 1, "blocks leaked"
    assert not runner.state, f"runner still holds {sorted(runner.state)}"
    assert all(v == 1 for v in runner.freed.values())
    return ended
