"""KV block manager: counts blocks, shares cached prefix blocks, decides nothing.

Blocks ``1..num_blocks-1`` serve requests; block 0 is the null block (padding) and is
never handed out. A full block whose KV has been scheduled is registered under its chained
hash (engine/hashing.py) and can be shared by any later request with the same prefix.
Freed blocks enter the free queue, cached ones keeping their hash: they can still be hit
until the queue reuses them, least recently freed first (a request's tail before its
head). Blocks that hold no cached content are reused before any cached one.
A block is registered when the step that fills it is scheduled, so a request admitted
later in that step may hit it: attention backends write a step's KV before reading any.
"""
from __future__ import annotations

from collections import OrderedDict

from engine.hashing import extend_block_hashes
from engine.request import Request


class _Held:
    """A request's block table; ``fast_limit``: token count it covers with nothing to do."""

    __slots__ = ("table", "offered", "fast_limit")

    def __init__(self) -> None:
        self.table: list[int] = []
        self.offered = 0  # leading blocks already offered to the prefix cache
        self.fast_limit = 0


class KVBlockManager:
    """Reference-counted paged KV blocks with prefix caching."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if not (isinstance(num_blocks, int) and num_blocks >= 2):
            raise ValueError(f"num_blocks must be an integer >= 2 (block 0 is the null block), "
                             f"got {num_blocks!r}")
        if not (isinstance(block_size, int) and block_size >= 1):
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt: list[int] = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self._cached: dict[bytes, int] = {}  # hash -> block id
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._held: dict[str, _Held] = {}  # request id -> its blocks
        # Cache entries registered per scheduled step, oldest first, until that step has run
        # (their KV may be unwritten): one step in flight, or two under async scheduling.
        self._uncommitted: list[list[int]] = []
        # Counters: prompt tokens looked up / served from the cache at first admission.
        self.num_query_tokens = 0
        self.num_hit_tokens = 0
        self.num_query_requests = 0
        self.num_evictions = 0

    # Queries ------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the usable pool held by requests (0.0 to 1.0)."""
        return 1.0 - len(self._free) / (self.num_blocks - 1)

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def get_block_ids(self, req: Request) -> list[int]:
        """A copy of the request's block table."""
        held = self._held.get(req.request_id)
        return list(held.table) if held is not None else []

    def get_computed_blocks(self, req: Request) -> tuple[list[int], int]:
        """Longest cached prefix of a request that holds no blocks: ``(block ids, tokens)``.

        Never covers the last token (its logits are needed): a fully cached prompt
        recomputes its whole last block, which is never shared for writing. A request that
        asks for prompt logprobs gets no hits (every prompt position's logits are needed).
        """
        if not self.enable_prefix_caching or req.sampling_params.prompt_logprobs is not None:
            return [], 0
        bs = self.block_size
        hashes = extend_block_hashes(req, bs, len(req.all_token_ids))
        max_blocks = (len(req.all_token_ids) - 1) // bs
        cached = self._cached
        blocks: list[int] = []
        for h in hashes[:max_blocks]:
            b = cached.get(h)
            if b is None:
                break
            blocks.append(b)
        return blocks, len(blocks) * bs

    # Changes ------------------------------------------------------------------------
    def allocate_slots(self, req: Request, num_new_tokens: int,
                       new_computed_blocks: list[int] | None = None) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens after ``req.num_computed_tokens``.

        ``new_computed_blocks`` (from ``get_computed_blocks``, for a request that holds no
        blocks yet) are prepended as shared hits; passing it, even empty, marks the
        request's admission (counted in the hit statistics on its first one).
        Returns the block ids appended to the request's table (maybe none), or None
        when the pool is short, in which case nothing changed.
        """
        held = self._held.get(req.request_id)
        if held is not None and new_computed_blocks is None:  # decode fast path
            if req.num_computed_tokens + num_new_tokens <= held.fast_limit:
                return []
        return self._allocate(req, num_new_tokens, new_computed_blocks, held)

    def _allocate(self, req: Request, num_new_tokens: int, new_computed_blocks: list[int] | None,
                  held: _Held | None) -> list[int] | None:
        rid, bs = req.request_id, self.block_size
        hits = new_computed_blocks or ()
        if hits and held is not None and held.table:
            raise ValueError(f"request {rid!r} already holds blocks; prefix hits apply only at admission")
        num_held = len(held.table) if held is not None else 0
        total = req.num_computed_tokens + len(hits) * bs + num_new_tokens
        need = -(-total // bs) - num_held - len(hits)
        new_ids: list[int] = []
        if need > 0 or hits or held is None:
            free = self._free
            if hits:
                ref = self.ref_cnt
                revived = sum(1 for b in hits if ref[b] == 0)  # hits waiting in the free queue
                if need > len(free) - revived:
                    return None
                for b in hits:
                    if ref[b] == 0:
                        del free[b]
                    ref[b] += 1
                new_ids.extend(hits)
            elif need > len(free):
                return None
            if held is None:
                held = self._held[rid] = _Held()
            for _ in range(need):
                new_ids.append(self._take_free_block())
            held.table.extend(new_ids)
        if new_computed_blocks is not None and req.num_preemptions == 0:
            self.num_query_requests += 1
            self.num_query_tokens += len(req.all_token_ids)
            self.num_hit_tokens += len(hits) * bs
        limit = len(held.table) * bs
        if self.enable_prefix_caching:
            known = min(total, len(req.all_token_ids))  # a placeholder's id is not known yet
            if known // bs > held.offered:
                self._cache_full_blocks(req, held, known // bs)
            limit = min(limit, (held.offered + 1) * bs - 1)  # until the next block fills
        held.fast_limit = limit
        return new_ids

    def free(self, req: Request) -> None:
        """Release all of a request's blocks (finish, abort or preemption)."""
        rid = req.request_id
        held = self._held.pop(rid, None)
        if held is None:
            return
        ref, free, hashes = self.ref_cnt, self._free, self.block_hash
        for b in reversed(held.table):  # tail first: a prefix outlives its suffixes in the cache
            r = ref[b] - 1
            if r < 0:
                raise RuntimeError(f"block {b} freed more often than allocated (request {rid!r})")
            ref[b] = r
            if r == 0:
                free[b] = None
                if hashes[b] is None:  # nothing worth keeping: reuse it first
                    free.move_to_end(b, last=False)

    def reset_prefix_cache(self) -> bool:
        """Forget all cached content; only possible while no block is held (else False)."""
        if len(self._free) != self.num_blocks - 1:
            return False
        self._cached.clear()
        self.block_hash = [None] * self.num_blocks
        self._uncommitted = []
        return True

    def commit(self, oldest_only: bool = False) -> None:
        """The steps that fill the blocks registered so far have run: keep them (``oldest_only``:
        just the oldest step's, async scheduling)."""
        if oldest_only:
            del self._uncommitted[:1]
        else:
            self._uncommitted = []

    def open_step(self) -> None:
        """Blocks registered from now on belong to a new scheduled step (called by ``schedule``)."""
        self._uncommitted.append([])

    def discard_uncommitted(self) -> None:
        """The step that was to fill the blocks registered since the last commit did not complete:
        forget their cache entries (the KV may be unwritten). Earlier entries stay valid."""
        for b in (b for step in self._uncommitted for b in step):
            h = self.block_hash[b]
            if h is not None and self._cached.get(h) == b:
                del self._cached[h]
            self.block_hash[b] = None
            if b in self._free:  # nothing worth keeping: reuse it first
                self._free.move_to_end(b, last=False)
        self._uncommitted = []

    def repair(self) -> int:
        """Make the reference counts and the free queue agree with the block tables again; the
        number of blocks fixed. An interrupt (Ctrl-C) can land between a count's change and the
        table's inside ``allocate_slots``; after aborting the interrupted call's requests, this
        returns any block so stranded to the pool (O(num_blocks): recovery only)."""
        counts = [0] * self.num_blocks
        for held in self._held.values():
            for b in held.table:
                counts[b] += 1
        fixed = 0
        for b in range(1, self.num_blocks):
            c = counts[b]
            if self.ref_cnt[b] != c or (c == 0) != (b in self._free):
                fixed += 1
                self.ref_cnt[b] = c
                if c == 0 and b not in self._free:
                    self._free[b] = None
                    self._free.move_to_end(b, last=False)  # its KV may be half-written: reuse it first
                    h = self.block_hash[b]
                    if h is not None and self._cached.get(h) == b:
                        del self._cached[h]
                    self.block_hash[b] = None
                elif c > 0 and b in self._free:
                    del self._free[b]
        return fixed

    # Internals ----------------------------------------------------------------------
    def _take_free_block(self) -> int:
        b, _ = self._free.popitem(last=False)
        h = self.block_hash[b]
        if h is not None:  # evict the cached content it held
            if self._cached.get(h) == b:
                del self._cached[h]
            self.block_hash[b] = None
            self.num_evictions += 1
        self.ref_cnt[b] = 1
        return b

    def _cache_full_blocks(self, req: Request, held: _Held, n_full: int) -> None:
        """Register the request's blocks ``[offered, n_full)``, full once this step runs."""
        hashes = extend_block_hashes(req, self.block_size, n_full * self.block_size)
        cached, block_hash, table = self._cached, self.block_hash, held.table
        for i in range(held.offered, n_full):
            b, h = table[i], hashes[i]
            # A hit block already carries h; a duplicate of cached content stays private.
            if block_hash[b] is None and h not in cached:
                cached[h] = b
                block_hash[b] = h
                if not self._uncommitted:
                    self._uncommitted.append([])
                self._uncommitted[-1].append(b)
        held.offered = n_full
