from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_manager import KVBlockManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from tests.engine.fake_runner import check_kv

pytestmark = pytest.mark.cpu
BS = 4


def _req(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(), cache_salt=salt)


def _admit(kv: KVBlockManager, req: Request, num_tokens: int | None = None) -> list[int] | None:
    """What the scheduler does for a waiting request: look up hits, allocate the rest."""
    hits, n_hit = kv.get_computed_blocks(req)
    n = (num_tokens or req.num_tokens) - n_hit
    blocks = kv.allocate_slots(req, n, hits)
    if blocks is not None:
        req.num_computed_tokens = n_hit + n
    return blocks


def test_null_block_is_never_handed_out_and_full_pool_refuses() -> None:
    kv = KVBlockManager(5, BS, enable_prefix_caching=False)
    a = _req("a", list(range(16)))
    assert _admit(kv, a) == [1, 2, 3, 4] and kv.num_free_blocks == 0 and kv.usage == 1.0
    b = _req("b", [1])
    assert _admit(kv, b) is None and kv.get_block_ids(b) == []  # nothing changed
    kv.free(a)
    assert kv.num_free_blocks == 4 and kv.usage == 0.0
    check_kv(kv)
    with pytest.raises(ValueError, match="num_blocks"):
        KVBlockManager(1, BS, True)


def test_decode_appends_a_block_only_when_the_last_one_is_full() -> None:
    kv = KVBlockManager(10, BS, True)
    r = _req("r", [1, 2, 3])
    assert _admit(kv, r) == [1]
    r.append_token(4)
    assert kv.allocate_slots(r, 1) == []  # position 3 still fits block 1
    assert kv.num_cached_blocks == 1  # and fills it: cached at once
    r.num_computed_tokens += 1
    r.append_token(5)
    assert kv.allocate_slots(r, 1) == [2]
    assert kv.get_block_ids(r) == [1, 2] and kv.num_cached_blocks == 1


def test_shared_prefix_hits_and_never_covers_the_last_token() -> None:
    kv = KVBlockManager(20, BS, True)
    a = _req("a", list(range(10)))  # blocks [0..3], [4..7] full, [8, 9] partial
    _admit(kv, a)
    b = _req("b", list(range(8)) + [99, 98, 97])
    hits, n = kv.get_computed_blocks(b)
    assert hits == kv.get_block_ids(a)[:2] and n == 8
    _admit(kv, b)
    assert b.num_computed_tokens == 11 and kv.ref_cnt[hits[0]] == 2
    # A prompt that is entirely cached still recomputes its whole last block.
    c = _req("c", list(range(8)))
    hits, n = kv.get_computed_blocks(c)
    assert n == 4 and hits == kv.get_block_ids(a)[:1]
    assert kv.num_query_requests == 2 and kv.num_query_tokens == 21 and kv.num_hit_tokens == 8
    assert kv.hit_rate == pytest.approx(8 / 21)
    check_kv(kv)


def test_salt_and_disabled_cache_never_hit() -> None:
    kv = KVBlockManager(20, BS, True)
    _admit(kv, _req("a", list(range(9)), salt="x"))
    assert kv.get_computed_blocks(_req("b", list(range(9)), salt="y")) == ([], 0)
    assert kv.get_computed_blocks(_req("c", list(range(9))))[1] == 0
    assert kv.get_computed_blocks(_req("d", list(range(9)), salt="x"))[1] == 8
    off = KVBlockManager(20, BS, False)
    _admit(off, _req("a", list(range(9))))
    assert off.get_computed_blocks(_req("b", list(range(9)))) == ([], 0) and off.num_cached_blocks == 0


def test_freed_blocks_stay_hittable_until_reused_lru_tail_first() -> None:
    kv = KVBlockManager(7, BS, True)  # 6 usable
    a = _req("a", list(range(9)))  # 2 full blocks + 1 partial
    _admit(kv, a)
    a_blocks = kv.get_block_ids(a)
    kv.free(a)
    assert kv.num_free_blocks == 6
    b = _req("b", list(range(8)) + [50])
    hits, n = kv.get_computed_blocks(b)
    assert hits == a_blocks[:2] and n == 8  # still cached after free
    # Reuse order: unused and uncached blocks first, then a's tail before its head.
    c = _req("c", [7] * 12)
    assert _admit(kv, c) == [a_blocks[2], 4, 5]
    d = _req("d", [8] * 4)
    assert _admit(kv, d) == [6]
    e = _req("e", [9] * 4)
    assert _admit(kv, e) == [a_blocks[1]] and kv.num_evictions == 1
    assert kv.get_computed_blocks(b) == (a_blocks[:1], 4)  # head survives, tail evicted
    check_kv(kv)


def test_hits_waiting_in_the_free_queue_count_against_capacity() -> None:
    kv = KVBlockManager(5, BS, True)  # 4 usable
    a = _req("a", list(range(8)) + [1])
    _admit(kv, a)  # 3 blocks, 2 cached
    kv.free(a)
    b = _req("b", list(range(8)) + [2] * 9)  # needs 2 hits + 3 fresh = 5 > 4
    before = (list(kv.ref_cnt), kv.num_free_blocks)
    assert _admit(kv, b) is None and (list(kv.ref_cnt), kv.num_free_blocks) == before
    c = _req("c", list(range(8)) + [2] * 5)  # 2 hits + 2 fresh = 4
    assert _admit(kv, c) is not None and kv.num_free_blocks == 0
    check_kv(kv)


def test_duplicate_content_stays_private() -> None:
    kv = KVBlockManager(20, BS, True)
    a, b = _req("a", list(range(9))), _req("b", list(range(9)))
    _admit(kv, a, num_tokens=2)  # a's first block not full yet: nothing cached
    _admit(kv, b)  # b computes the same block and caches it
    kv.allocate_slots(a, 7)  # a completes its own copy: stays private
    a_first = kv.get_block_ids(a)[0]
    assert kv.block_hash[a_first] is None and kv.block_hash[kv.get_block_ids(b)[0]] is not None
    check_kv(kv)


def test_reset_prefix_cache() -> None:
    kv = KVBlockManager(10, BS, True)
    a = _req("a", list(range(9)))
    _admit(kv, a)
    assert kv.reset_prefix_cache() is False  # blocks held
    kv.free(a)
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(_req("b", list(range(9)))) == ([], 0) and kv.num_cached_blocks == 0


def test_preempted_requests_do_not_count_in_hit_stats() -> None:
    kv = KVBlockManager(10, BS, True)
    a = _req("a", list(range(9)))
    _admit(kv, a)
    kv.free(a)
    a.num_computed_tokens, a.num_preemptions = 0, 1
    _admit(kv, a)
    assert a.num_computed_tokens == 9 and kv.num_query_requests == 1 and kv.num_hit_tokens == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["admit", "grow", "free"]), st.integers(0, 5),
                          st.integers(1, 14)), max_size=60),
       st.integers(2, 16), st.booleans())
def test_random_operations_keep_counts_consistent(ops: list, num_blocks: int, caching: bool) -> None:
    kv = KVBlockManager(num_blocks, BS, caching)
    reqs: dict[int, Request] = {}
    for op, key, n in ops:
        req = reqs.get(key)
        if op == "admit" and req is None:
            req = _req(f"r{key}", [key % 2] * n)  # two families of shared prefixes
            if _admit(kv, req) is not None:
                reqs[key] = req
                assert req.num_computed_tokens == req.num_tokens
        elif op == "grow" and req is not None:
            for t in range(n):
                req.append_token(t)
            if kv.allocate_slots(req, n) is not None:
                req.num_computed_tokens += n
            else:
                del req.all_token_ids[-n:], req.output_token_ids[-n:]
        elif op == "free" and req is not None:
            kv.free(reqs.pop(key))
        check_kv(kv)
        for r in reqs.values():
            assert len(kv.get_block_ids(r)) == -(-r.num_computed_tokens // BS)
    for r in reqs.values():
        kv.free(r)
    check_kv(kv)
    assert kv.num_free_blocks == num_blocks - 1


def test_repair_returns_blocks_an_interrupt_stranded() -> None:
    """A Ctrl-C between a block's count and the request's table: after the abort, ``repair``
    gives the block back (and only then are counts and tables consistent)."""
    kv = KVBlockManager(num_blocks=9, block_size=4, enable_prefix_caching=True)
    a = _req("a", list(range(10)))
    real = kv._take_free_block

    def take() -> int:
        real()
        raise KeyboardInterrupt
    kv._take_free_block = take
    with pytest.raises(KeyboardInterrupt):
        kv.allocate_slots(a, 10, [])
    del kv._take_free_block
    kv.free(a)
    assert kv.num_free_blocks == 7, "one block is stranded before the repair"
    assert kv.repair() == 1
    check_kv(kv)
    assert kv.num_free_blocks == 8 and kv.repair() == 0
