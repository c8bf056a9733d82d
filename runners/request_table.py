"""The runner's request table: request id -> its state and its row.

A request holds one row index in both the persistent ``InputBatch`` (tokens, progress, block
table) and the ``SamplingState`` (parameters, seed, penalty counts) from admission to finish or
preemption; while it holds none (not yet admitted, or preempted) its tokens are parked here.
A request keeps the seed drawn at its first admission for its whole life. This table is the
one place that gives rows out and takes them back.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from engine.outputs import SchedulerOutput
from runners.input_batch import InputBatch, RequestState
from runners.sampling_state import SamplingState


class RequestTable:
    """Read like a mapping (``table[rid]``, ``rid in table``, iteration, ``len``); changed only
    by ``apply(scheduler_output)`` (and ``drop``)."""

    def __init__(self, input_batch: InputBatch, sampling_state: SamplingState) -> None:
        self.input_batch, self.sampling_state = input_batch, sampling_state
        self._states: dict[str, RequestState] = {}
        self.version = 0  # bumped by every change of who holds which row


    def __getitem__(self, req_id: str) -> RequestState:
        return self._states[req_id]

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._states

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def get(self, req_id: str) -> RequestState | None:
        return self._states.get(req_id)

    def rows(self, req_ids: list[str]) -> np.ndarray:
        """The rows of ``req_ids`` (all must hold one), in order."""
        states = self._states
        return np.fromiter((states[r].row for r in req_ids), dtype=np.int64, count=len(req_ids))

    def apply(self, so: SchedulerOutput) -> None:
        """Finished requests leave, preempted ones park, new ones are admitted, cached ones get
        their new blocks (a resumed one is re-admitted with its whole block table) - in that
        order, the scheduler's contract."""
        self.version += 1
        for rid in so.finished_req_ids:
            self.drop(rid)
        for rid in so.preempted_req_ids:
            st = self._states.get(rid)
            if st is not None and st.row is not None:
                st.parked_tokens = self._release(st, keep_tokens=True)
        for new in so.scheduled_new_reqs:
            self.drop(new.req_id)  # a known id sent as new replaces the old request
            st = RequestState(new.req_id, len(new.prompt_token_ids), new.sampling_params, None,
                              parked_tokens=np.asarray(new.prompt_token_ids, dtype=np.int32))
            self._states[new.req_id] = st
            self._admit(st, new.block_ids, new.num_computed_tokens)
        cached, ib = so.scheduled_cached_reqs, self.input_batch
        for i, rid in enumerate(cached.req_ids):
            st = self._states[rid]
            if cached.resumed_from_preemption[i] or st.row is None:
                self._admit(st, cached.new_block_ids[i], cached.num_computed_tokens[i])
            else:
                ib.append_blocks(st.row, cached.new_block_ids[i])
                ib.num_computed[st.row] = cached.num_computed_tokens[i]

    def drop(self, req_id: str) -> None:
        """Forget a request (and free its row, if it holds one); unknown ids are ignored."""
        self.version += 1
        st = self._states.pop(req_id, None)
        if st is not None and st.row is not None:
            self._release(st, keep_tokens=False)

    def _release(self, st: RequestState, keep_tokens: bool) -> np.ndarray | None:
        """Give ``st``'s row back to the input batch and the sampling state; its tokens if asked."""
        tokens = self.input_batch.tokens(st.row) if keep_tokens else None
        self.input_batch.remove(st.row)
        self.sampling_state.remove_request(st.row)
        st.row = None
        return tokens

    def _admit(self, st: RequestState, block_ids: list[int], num_computed: int) -> None:
        """Give ``st`` a fresh row holding its tokens (parked, or those of the row it had)."""
        tokens = self._release(st, keep_tokens=True) if st.row is not None else st.parked_tokens
        st.row = self.input_batch.add(tokens, block_ids, num_computed)
        st.seed = self.sampling_state.add_request(  # a resumed request keeps its first seed
            st.row, st.sampling_params, tokens[:st.num_prompt_tokens], tokens[st.num_prompt_tokens:],
            seed=st.seed)
        st.parked_tokens = None
