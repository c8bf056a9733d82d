"""The scheduler: decides which requests run each step and with how many tokens.

Policy, one step: running requests first, in admission order (a decode token each or
their next prefill chunk), then waiting ones, first come first served, all sharing one
token budget (``max_num_batched_tokens``), so a step mixes decodes and prefill chunks.
``long_prefill_token_threshold > 0`` caps one request's chunk. When the pool runs dry the
newest running request is preempted (blocks freed, back to the front of the queue, later
recomputed from prompt + generated tokens; prefix hits usually shorten that), and a step
that preempted admits nobody. A request's ``num_computed_tokens`` advances when it is
scheduled; its sampled token arrives in ``update_from_output``.

The runner applies a ``SchedulerOutput`` in this order: finished, preempted, new, cached.
A request never appears as preempted and scheduled in the same output. Resumed
requests come as cached requests (the runner kept their tokens), with their whole block
table in ``new_block_ids``.

Faults: a step's prefix-cache entries are kept once its output is applied (or the next step
is scheduled); ``discard_step()`` forgets them, and aborts its requests, when it failed.
Finished ids reach the runner at least once (again after a failed step): it ignores unknown ones.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from engine.block_manager import KVBlockManager
from engine.config import EngineConfig
from engine.multimodal import fit_encoder_budget
from engine.outputs import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from engine.request import Request, RequestStatus

_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED


@dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int
    num_finished: int
    kv_cache_usage: float
    prefix_cache_queries: int  # prompt tokens looked up at first admission
    prefix_cache_hits: int  # of which served from the cache
    prefix_cache_hit_rate: float


class Scheduler:
    """Chunked prefill, prefix caching and preemption over one ``KVBlockManager``."""

    def __init__(self, config: EngineConfig, num_kv_blocks: int) -> None:
        if config.max_model_len is None:
            raise ValueError("Scheduler needs a resolved config.max_model_len (the engine takes it "
                             "from the model's max_position_embeddings when unset)")
        self.config = config
        self.max_model_len = config.max_model_len
        self.block_size = config.block_size
        self.kv = KVBlockManager(num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}  # unfinished requests
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished: dict[str, Request] = {}  # since the last schedule()
        self._resend: set[str] = set()  # finished ids a failed step may not have delivered
        # Scheduled, output not yet applied, oldest first (one step; two with async scheduling),
        # with the ids of the requests each step samples a token for.
        self._inflight: deque[tuple[SchedulerOutput, set[str]]] = deque()
        self.async_scheduling = bool(getattr(config, "async_scheduling", False))
        self.last_accepted: set[str] = set()  # ids whose tokens the last update appended
        self.num_preemptions = 0
        self.num_finished = 0
        # Image tokens the vision encoder may take per step (multimodal requests only); unless set,
        # max_num_batched_tokens raised to the largest image admitted, so every image fits.
        self.encoder_budget = config.max_num_encoder_input_tokens or config.max_num_batched_tokens
        self._encoder_left = 0

    # Requests in and out ---------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        self.check_request(req)
        if req.mm_inputs and self.config.max_num_encoder_input_tokens is None:
            self.encoder_budget = max(self.encoder_budget, max(mm.length for mm in req.mm_inputs))
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def check_request(self, req: Request) -> None:
        """ValueError if ``add_request`` would refuse ``req`` (changes nothing): check a batch first."""
        rid = req.request_id
        if rid in self.requests:
            raise ValueError(f"request id {rid!r} is already scheduled")
        if req.status is not RequestStatus.WAITING or req.num_computed_tokens or req.output_token_ids:
            raise ValueError(f"request {rid!r} must be new (WAITING, nothing computed), got {req!r}")
        for mm in req.mm_inputs if self.config.max_num_encoder_input_tokens else ():
            if mm.length > self.encoder_budget:
                raise ValueError(f"request {rid!r}: an image of {mm.length} tokens exceeds the encoder budget of "
                                 f"{self.encoder_budget} tokens per step: raise max_num_encoder_input_tokens "
                                 f"(default max_num_batched_tokens) or pass a smaller image")
        n, mml = req.num_prompt_tokens, self.max_model_len
        if n > mml:
            raise ValueError(f"request {rid!r}: the prompt has {n} tokens, more than max_model_len={mml}")
        # KV slots at worst: every token but the last one sampled (it stops at max_model_len).
        final_len = min(n + (req.sampling_params.max_tokens or mml), max(mml, n + 1))
        need = -(-(final_len - 1) // self.block_size)
        if need > self.kv.num_blocks - 1:
            raise ValueError(
                f"request {rid!r} may reach {final_len} tokens ({n} prompt + up to "
                f"{final_len - n} generated, max_model_len={mml}), needing {need} KV blocks of "
                f"block_size={self.block_size}, but the pool has num_kv_blocks={self.kv.num_blocks} "
                f"({self.kv.num_blocks - 1} usable): raise num_kv_blocks (or the KV memory), "
                f"or lower max_model_len / max_tokens")

    def finish_requests(self, req_ids: str | Iterable[str], status: RequestStatus) -> None:
        """Finish requests from outside (aborts, stop strings); unknown or finished ids are ignored."""
        if not RequestStatus(status).finished:
            raise ValueError(f"status must be a finished status, got {RequestStatus(status).name}")
        if isinstance(req_ids, str):
            req_ids = (req_ids,)
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is None:
                continue
            self._unlink(req)
            req.status = RequestStatus(status)
            self._release(req)

    def abort_requests(self, req_ids: str | Iterable[str]) -> list[str]:
        """Abort unfinished requests (unknown or finished ids are ignored); returns those aborted.

        Their blocks return to the pool now; full blocks stay in the prefix cache (completed
        steps wrote them). The runner drops them when the next output lists them in
        ``finished_req_ids``; rows a step in flight returns for them are ignored.
        """
        ids = [req_ids] if isinstance(req_ids, str) else list(req_ids)
        aborted = [rid for rid in dict.fromkeys(ids) if rid in self.requests]
        self.finish_requests(aborted, RequestStatus.FINISHED_ABORTED)
        return aborted

    def discard_step(self) -> list[str]:
        """The step last scheduled did not complete (an exception or Ctrl-C inside ``schedule()``
        or before its output was applied): its prefix-cache entries are forgotten (their KV may
        be unwritten), its finished ids are reported again, and every request it scheduled or
        preempted is aborted (their progress is unknown). Returns the ids aborted. After an
        interrupted ``schedule()`` the caller aborts the requests it may have touched."""
        steps, self._inflight = [so for so, _ in self._inflight], deque()
        self.kv.discard_uncommitted()  # also those of a schedule() that never returned
        ids: list[str] = []
        for so in steps:
            self._resend |= so.finished_req_ids
            ids += [*so.num_scheduled_tokens, *so.preempted_req_ids]
        return self.abort_requests(ids)

    def repair(self) -> None:
        """After the interrupted call's requests are aborted: blocks an interrupt stranded
        between a reference count and a block table go back to the pool (``KVBlockManager.repair``)."""
        self.kv.repair()

    def drain_finished(self) -> SchedulerOutput:
        """A step that schedules nothing and reports the requests ended since the last one, so the
        runner can drop them now (after aborts, or at the end of a batch)."""
        so = SchedulerOutput.empty()
        so.finished_req_ids = self._take_finished()
        self.kv.commit()
        self.kv.open_step()
        self._inflight.append((so, set()))
        return so

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def has_finished_requests(self) -> bool:
        """Requests finished since the last schedule() (not yet reported to the runner)."""
        return bool(self._finished or self._resend)

    def get_request(self, req_id: str) -> Request | None:
        """An unfinished request, or one finished since the last schedule(); else None."""
        req = self.requests.get(req_id)
        return req if req is not None else self._finished.get(req_id)

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()

    def stats(self) -> SchedulerStats:
        kv = self.kv
        return SchedulerStats(len(self.running), len(self.waiting), self.num_preemptions,
                              self.num_finished, kv.usage, kv.num_query_tokens, kv.num_hit_tokens,
                              kv.hit_rate)

    # One step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Decide this step; advances ``num_computed_tokens`` of every scheduled request.

        A request that samples in this step gets a placeholder for its token until
        ``update_from_output`` brings it. With async scheduling the next ``schedule()`` may come
        first: a running request then computes its placeholder (the runner fills the id in on
        the device), unless the placeholder already ends it (max_tokens, max_model_len).
        """
        budget = self.config.max_num_batched_tokens
        cap = self.config.long_prefill_token_threshold
        kv, running = self.kv, self.running
        if not self.async_scheduling:
            kv.commit()  # a new step: the previous one's outcome was accepted
        kv.open_step()
        sampling: set[str] = set()
        mml = self.max_model_len
        num_scheduled: dict[str, int] = {}
        cached = CachedRequestData()
        c_ids, c_resumed = cached.req_ids, cached.resumed_from_preemption
        c_blocks, c_computed = cached.new_block_ids, cached.num_computed_tokens
        preempted: set[str] = set()
        allocate = kv.allocate_slots
        add_id, add_blocks, add_computed = c_ids.append, c_blocks.append, c_computed.append
        self._encoder_left = self.encoder_budget

        for req in running:  # preemption pops the tail, which this loop then never reaches
            if budget <= 0:
                break
            if req.num_output_placeholders and (
                    req.num_output_tokens + req.num_output_placeholders >= req.sampling_params.max_tokens
                    or req.num_tokens_with_placeholders >= mml):
                continue  # its pending token ends it: nothing more to compute
            n = req.num_tokens_with_placeholders - req.num_computed_tokens
            if n > 1 and 0 < cap < n:
                n = cap
            if n > budget:
                n = budget
            enc_cost = 0
            if req.mm_inputs:
                n, enc_cost = fit_encoder_budget(req.mm_inputs, req.num_computed_tokens, n, False, self._encoder_left)
                if n == 0:
                    continue
            new_blocks = allocate(req, n)
            if new_blocks is None:
                new_blocks = self._preempt_for(req, n, preempted)
                if new_blocks is None:
                    break  # req itself was preempted
            rid = req.request_id
            add_id(rid)
            add_blocks(new_blocks)
            add_computed(req.num_computed_tokens)
            num_scheduled[rid] = n
            req.num_computed_tokens += n
            budget -= n
            self._encoder_left -= enc_cost
            if req.num_computed_tokens >= req.num_tokens_with_placeholders:
                req.num_output_placeholders += 1
                sampling.add(rid)
        c_resumed.extend([False] * len(c_ids))

        new_reqs: list[NewRequestData] = []
        if not preempted:
            budget = self._admit(budget, cached, new_reqs, num_scheduled, sampling)

        so = SchedulerOutput(new_reqs, cached, num_scheduled, self.config.max_num_batched_tokens - budget,
                             self._take_finished(), preempted)
        self._inflight.append((so, sampling))
        return so

    def _take_finished(self) -> set[str]:
        # The runner holds state only for requests it was sent (scheduled at least once).
        finished = {rid for rid, r in self._finished.items() if r.num_cached_tokens >= 0} | self._resend
        self._finished, self._resend = {}, set()
        return finished

    def _admit(self, budget: int, cached: CachedRequestData, new_reqs: list[NewRequestData],
               num_scheduled: dict[str, int], sampling: set[str]) -> int:
        """Move waiting requests to running, FCFS, while budget, seats and blocks last."""
        kv, waiting, running = self.kv, self.waiting, self.running
        cap = self.config.long_prefill_token_threshold
        max_seqs = self.config.max_num_seqs
        while waiting and budget > 0 and len(running) < max_seqs:
            req = waiting[0]
            hit_blocks, num_hit = kv.get_computed_blocks(req)
            n = len(req.all_token_ids) - num_hit
            if 0 < cap < n:
                n = cap
            if n > budget:
                n = budget
            enc_cost = 0
            if req.mm_inputs:  # fresh: the runner holds no encoder output of a request it admits
                n, enc_cost = fit_encoder_budget(req.mm_inputs, num_hit, n, True, self._encoder_left)
                if n == 0:
                    break
            if kv.allocate_slots(req, n, hit_blocks) is None:
                break  # FCFS: nobody overtakes the head of the queue
            waiting.popleft()
            running.append(req)
            rid = req.request_id
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            if req.status is _PREEMPTED:
                cached.req_ids.append(rid)
                cached.resumed_from_preemption.append(True)
                cached.new_block_ids.append(kv.get_block_ids(req))
                cached.num_computed_tokens.append(num_hit)
            else:
                new_reqs.append(NewRequestData(rid, req.prompt_token_ids, req.sampling_params,
                                               kv.get_block_ids(req), num_hit, req.mm_inputs))
            req.status = _RUNNING
            req.num_computed_tokens = num_hit + n
            num_scheduled[rid] = n
            budget -= n
            self._encoder_left -= enc_cost
            if req.num_computed_tokens >= req.num_tokens_with_placeholders:
                req.num_output_placeholders += 1
                sampling.add(rid)
        return budget

    def update_from_output(self, sched: SchedulerOutput, out: ModelRunnerOutput) -> list[Request]:
        """Append sampled tokens, apply stop conditions, release finished requests.

        Returns the requests that finished in this update. Rows of requests that ended
        since ``sched`` was made (aborts) are ignored. Logprobs are the engine's to keep.
        ``sched`` is the output this ``out`` answers (part of the contract; unused today).
        """
        requests, mml = self.requests, self.max_model_len
        sampling = self._inflight.popleft()[1] if self._inflight else set()
        self.last_accepted = accepted = set()
        self.kv.commit(oldest_only=self.async_scheduling)
        finished: list[Request] = []
        for rid, tokens in zip(out.req_ids, out.sampled_token_ids):
            req = requests.get(rid)
            if req is None or rid not in sampling:
                continue  # ended since (its late token is dropped), or a partial prefill
            if not tokens:
                raise RuntimeError(f"request {rid!r} finished its prefill but the runner sampled no token for it")
            req.num_output_placeholders -= 1
            if req.status.finished:
                continue
            accepted.add(rid)
            for tok in tokens:  # a request preempted since this step was made takes its token too
                req.append_token(tok)
                if req.check_stop(mml):
                    finished.append(req)
                    break
        if finished:
            for req in finished:
                self._release(req)
            self.running = [r for r in self.running if r.status is _RUNNING]
            if any(r.request_id in self._finished for r in self.waiting):  # preempted since
                self.waiting = deque(r for r in self.waiting if not r.status.finished)
        return finished

    # Internals -------------------------------------------------------------------------
    def _preempt_for(self, req: Request, n: int, preempted: set[str]) -> list[int] | None:
        """Preempt the newest running requests until ``req`` gets its blocks (or is the victim)."""
        while True:
            victim = self.running.pop()  # never one scheduled earlier in this step
            self._preempt(victim, preempted)
            if victim is req:
                return None
            new_blocks = self.kv.allocate_slots(req, n)
            if new_blocks is not None:
                return new_blocks

    def _preempt(self, req: Request, preempted: set[str]) -> None:
        self.kv.free(req)
        req.status = _PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        preempted.add(req.request_id)

    def _unlink(self, req: Request) -> None:
        """Take a request out of its queue; it may be in neither if an exception interrupted a move."""
        first, second = (self.running, self.waiting) if req.status is _RUNNING else (self.waiting, self.running)
        for queue in (first, second):
            try:
                queue.remove(req)
                return
            except ValueError:
                pass

    def _release(self, req: Request) -> None:
        self.kv.free(req)
        del self.requests[req.request_id]
        self._finished[req.request_id] = req
        self.num_finished += 1
