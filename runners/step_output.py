"""A launched step's output on its way to the host (``execute_model_async``).

The sampled ids stay on the device; a copy goes to pinned host memory behind an event, read by
``result()``. Until then the host's persistent batch holds a placeholder (-1) at each sampled
token's position; ``result()`` writes the ids in by request (into its row, or into its parked
tokens if it was preempted since; a request dropped since is skipped). A step built before that
takes those ids straight from the device (``scatter_pending``): no host round trip between steps.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from engine.executor import StepHandle
from engine.outputs import ModelRunnerOutput, SampleLogprobs
from runners.inputs import StepInputs
from runners.request_table import RequestTable
from runners.step_buffers import StepBuffers


class RunnerStep(StepHandle):
    """``states[i]`` sampled ``ids[i]`` for its token at ``positions[i]`` (batch index ``where[i]``)."""

    def __init__(self, req_ids: list[str], where: np.ndarray, rows: np.ndarray, positions: np.ndarray,
                 ids_dev: torch.Tensor, host_ids: torch.Tensor | None, event: object | None,
                 logprobs: Callable[[], list[SampleLogprobs | None]] | None, table: RequestTable,
                 prompt_logprobs: dict | None = None) -> None:
        self.req_ids, self.where, self.rows, self.positions = req_ids, where, rows, positions
        self.ids_dev, self._host, self._event, self._logprobs = ids_dev, host_ids, event, logprobs
        self._table, self._version, self._prompt_logprobs = table, table.version, prompt_logprobs
        # Who sampled, as of the launch: checked only if the table changed before ``result()``.
        self.states = [table[req_ids[i]] for i in where.tolist()]
        self._output: ModelRunnerOutput | None = None
        self._pending: dict[str, tuple[int, int]] | None = None

    @property
    def resolved(self) -> bool:
        return self._output is not None

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            ids = (self._host if self._host is not None else self.ids_dev).numpy()[:len(self.states)].copy()
            ib, table = self._table.input_batch, self._table
            if table.version == self._version:  # rows unchanged since the launch (synchronous use)
                ib.token_ids[self.rows, self.positions] = ids
            else:  # a later step moved rows: route each id by its request
                for st, pos, tok in zip(self.states, self.positions.tolist(), ids.tolist()):
                    if table.get(st.req_id) is not st:
                        continue  # finished or replaced since: its late token is not wanted
                    if st.row is not None:
                        ib.token_ids[st.row, pos] = tok
                    elif st.parked_tokens is not None:
                        st.parked_tokens[pos] = tok
            sampled: list[list[int]] = [[] for _ in self.req_ids]
            for i, tok in zip(self.where.tolist(), ids.tolist()):
                sampled[i] = [tok]
            logprobs = None
            if self._logprobs is not None:
                logprobs = [None] * len(self.req_ids)
                for i, entry in zip(self.where.tolist(), self._logprobs()):
                    logprobs[i] = entry
            self._output = ModelRunnerOutput(self.req_ids, sampled, logprobs, self._prompt_logprobs)
        return self._output

    def scatter_pending(self, step: StepInputs, buffers: StepBuffers) -> None:
        """Put this step's (still unread) ids into ``step``'s input ids, on the device, where
        ``step`` computes one of their positions. The indices go up through ``buffers`` (the
        step's pinned staging set, asynchronously): a blocking upload would wait for the device
        to finish the step in flight, which is what launching ahead avoids."""
        if self.resolved:
            return
        if self._pending is None:
            self._pending = {st.req_id: (i, int(p)) for i, (st, p) in enumerate(zip(self.states, self.positions))}
        qsl, lens = step.md.query_start_loc_cpu, step.md.seq_lens_cpu
        dst, src = buffers.np["pending_dst"], buffers.np["pending_src"]
        k = 0
        for i, rid in enumerate(step.req_ids):
            hit = self._pending.get(rid)
            if hit is None:
                continue
            start = int(lens[i]) - int(qsl[i + 1] - qsl[i])
            if start <= hit[1] < int(lens[i]):
                dst[k] = int(qsl[i]) + hit[1] - start
                src[k] = hit[0]
                k += 1
        if k:
            step.input_ids[buffers.to_device("pending_dst", k)] = self.ids_dev[buffers.to_device("pending_src", k)]
