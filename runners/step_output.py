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
from runners.input_batch import InputBatch, RequestState

PLACEHOLDER = -1


class RunnerStep(StepHandle):
    """``states[i]`` sampled ``ids[i]`` for its token at ``positions[i]`` (batch index ``where[i]``)."""

    def __init__(self, req_ids: list[str], where: np.ndarray, states: list[RequestState], positions: np.ndarray,
                 ids_dev: torch.Tensor, host_ids: torch.Tensor | None, event: object | None,
                 logprobs: Callable[[], list[SampleLogprobs | None]] | None, current: Callable[[str], object],
                 input_batch: InputBatch, prompt_logprobs: dict | None = None) -> None:
        self.req_ids, self.where, self.states, self.positions = req_ids, where, states, positions
        self.ids_dev, self._host, self._event, self._logprobs = ids_dev, host_ids, event, logprobs
        self._current, self._input_batch, self._prompt_logprobs = current, input_batch, prompt_logprobs
        self._output: ModelRunnerOutput | None = None
        self._pending = {st.req_id: (i, int(p)) for i, (st, p) in enumerate(zip(states, positions))}

    @property
    def resolved(self) -> bool:
        return self._output is not None

    def result(self) -> ModelRunnerOutput:
        if self._output is None:
            if self._event is not None:
                self._event.synchronize()
            ids = (self._host if self._host is not None else self.ids_dev).numpy()[:len(self.states)].copy()
            ib = self._input_batch
            for st, pos, tok in zip(self.states, self.positions.tolist(), ids.tolist()):
                if self._current(st.req_id) is not st:
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

    def scatter_pending(self, step: StepInputs) -> None:
        """Put this step's (still unread) ids into ``step``'s input ids, on the device, where
        ``step`` computes one of their positions."""
        if self.resolved or not self._pending:
            return
        qsl, lens = step.md.query_start_loc_cpu, step.md.seq_lens_cpu
        dst, src = [], []
        for i, rid in enumerate(step.req_ids):
            hit = self._pending.get(rid)
            if hit is None:
                continue
            start = int(lens[i]) - int(qsl[i + 1] - qsl[i])
            if start <= hit[1] < int(lens[i]):
                dst.append(int(qsl[i]) + hit[1] - start)
                src.append(hit[0])
        if dst:
            dev = step.input_ids.device
            step.input_ids[torch.tensor(dst, device=dev)] = self.ids_dev[torch.tensor(src, device=dev)]
