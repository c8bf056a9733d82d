"""The runner's multimodal state (M-RoPE models with a vision encoder; None for text models, so
text-only models pay nothing): each request's M-RoPE positions, computed once, and the encoder
cache - image embeddings from the step that first meets an image until the step that schedules
its last placeholder token. ``ModelRunnerBase`` reaches it through ``_calc_mrope_positions``,
``_execute_encoder`` and ``_gather_encoder_outputs``.

The rule the scheduler's encoder budget mirrors (engine/multimodal.py): an image is encoded in a
step that meets its placeholder range when the cache lacks it (its first step, or the first
after admission); a preempted or finished request's entries are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.multimodal import MultiModalInput, overlapping
from engine.outputs import NewRequestData, SchedulerOutput
from runners.request_table import RequestTable


def mrope_positions(num_tokens: int, mm_inputs: tuple[MultiModalInput, ...], merge: int) -> tuple[np.ndarray, int]:
    """``([3, num_tokens] positions, delta)`` of a prompt: text tokens count up on all three rows;
    an image's tokens get (t, h, w) grid coordinates after the text before it, and the text after
    it resumes past its largest coordinate. A token after the prompt at index ``i`` is at
    ``i + delta`` on all rows."""
    pos = np.empty((3, num_tokens), dtype=np.int64)
    cur = prev = 0
    for mm in mm_inputs:
        pos[:, prev:mm.offset] = cur + np.arange(mm.offset - prev)
        cur += mm.offset - prev
        t, h, w = mm.grid_thw
        grid = np.indices((t, h // merge, w // merge)).reshape(3, -1)
        if grid.shape[1] != mm.length:
            raise ValueError(f"an image's grid {mm.grid_thw} gives {grid.shape[1]} tokens, not its {mm.length} "
                             f"placeholder tokens")
        pos[:, mm.offset:mm.end] = grid + cur
        cur += max(t, h // merge, w // merge)
        prev = mm.end
    pos[:, prev:] = cur + np.arange(num_tokens - prev)
    return pos, int(pos.max()) + 1 - num_tokens if num_tokens else 0


@dataclass
class _Request:
    mm_inputs: tuple[MultiModalInput, ...]
    positions: np.ndarray  # [3, prompt tokens]
    delta: int


class MultiModalState:
    """Per-request M-RoPE positions and the encoder cache of one runner."""

    def __init__(self, merge: int, max_num_reqs: int, device: torch.device, pin_memory: bool = False) -> None:
        self.merge, self.device, self.pin_memory = merge, device, pin_memory
        self.requests: dict[str, _Request] = {}  # requests with images
        self.active: set[str] = set()  # requests with images whose placeholders are not all computed
        self.cache: dict[tuple[str, int], torch.Tensor] = {}
        self.row_delta = np.zeros(max_num_reqs, dtype=np.int64)  # per persistent row
        self.rows: dict[str, int] = {}  # the rows of requests with images

    # Requests -------------------------------------------------------------------------
    def update(self, so: SchedulerOutput, table: RequestTable) -> None:
        """After the request table applied ``so``: forget finished requests, drop the cache of
        preempted ones, compute new requests' positions, set the rows' decode deltas."""
        for rid in so.finished_req_ids:
            self._left(rid)
            self.requests.pop(rid, None)
        for rid in so.preempted_req_ids:
            self._left(rid)
        for new in so.scheduled_new_reqs:  # a known id sent as new replaces the old request
            self._left(new.req_id)
            self.requests.pop(new.req_id, None)
        for new in so.scheduled_new_reqs:
            if new.mm_inputs:
                self.add_request(new)
                self._admitted(new.req_id, table[new.req_id].row)
        cached = so.scheduled_cached_reqs
        for rid, resumed in zip(cached.req_ids, cached.resumed_from_preemption):
            if resumed and rid in self.requests:
                self._left(rid)
                self._admitted(rid, table[rid].row)

    def add_request(self, new: NewRequestData) -> None:
        """A request's M-RoPE positions and decode delta, once (``_calc_mrope_positions``)."""
        pos, delta = mrope_positions(len(new.prompt_token_ids), new.mm_inputs, self.merge)
        self.requests[new.req_id] = _Request(tuple(new.mm_inputs), pos, delta)

    def _admitted(self, rid: str, row: int) -> None:
        """A request with images got ``row``: its delta there (rows of text requests stay 0)."""
        self.row_delta[row] = self.requests[rid].delta
        self.rows[rid] = row
        self.active.add(rid)

    def _left(self, rid: str) -> None:
        """A request with images left its row (finished, preempted, replaced): drop its cache."""
        req = self.requests.get(rid)
        if req is not None:
            for i in range(len(req.mm_inputs)):
                self.cache.pop((rid, i), None)
        row = self.rows.pop(rid, None)
        if row is not None:
            self.row_delta[row] = 0
        self.active.discard(rid)

    # One step -------------------------------------------------------------------------
    def positions(self, req_ids: list[str], rows: np.ndarray, computed: np.ndarray, num_sched: np.ndarray,
                  padded: int) -> torch.Tensor:
        """``[3, padded]`` positions of a step (``num_sched[k]`` tokens after ``computed[k]``): a
        prompt token of a request with images at its M-RoPE position, any other token at its
        index + its request's delta; padding at 0."""
        n = int(num_sched.sum())
        starts = np.cumsum(num_sched) - num_sched
        out = np.zeros((3, padded), dtype=np.int64)
        out[:, :n] = np.arange(n) + np.repeat(computed - starts + self.row_delta[rows], num_sched)
        if self.active:
            for k, rid in self._scheduled_active(req_ids):
                pos = self.requests[rid].positions
                c = int(computed[k])
                m = min(int(num_sched[k]), pos.shape[1] - c)
                if m > 0:
                    out[:, starts[k]:starts[k] + m] = pos[:, c:c + m]
        return self._upload(out)

    def execute_encoder(self, model: torch.nn.Module, req_ids: list[str], computed: np.ndarray,
                        num_sched: np.ndarray) -> None:
        """Encode, in one batch, the images this step meets that the cache lacks."""
        todo: list[tuple[tuple[str, int], MultiModalInput]] = []
        for k, rid in self._scheduled_active(req_ids):
            mm_inputs = self.requests[rid].mm_inputs
            c = int(computed[k])
            for i in overlapping(mm_inputs, c, c + int(num_sched[k])):
                if (rid, i) not in self.cache:
                    todo.append(((rid, i), mm_inputs[i]))
        if not todo:
            return
        pixels = self._upload(np.concatenate([mm.pixel_values for _, mm in todo]))
        embeds = model.embed_images(pixels, [mm.grid_thw for _, mm in todo])
        for (key, mm), emb in zip(todo, embeds.split([mm.length for _, mm in todo])):
            self.cache[key] = emb

    def gather(self, req_ids: list[str], computed: np.ndarray,
               num_sched: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(step token indices, embeddings) of exactly the placeholder tokens scheduled this step
        (a chunk may start or end inside an image); frees what no later step needs."""
        if not self.active:
            return None
        idx: list[np.ndarray] = []
        embeds: list[torch.Tensor] = []
        starts = np.cumsum(num_sched) - num_sched
        for k, rid in self._scheduled_active(req_ids):
            req = self.requests[rid]
            c, end = int(computed[k]), int(computed[k] + num_sched[k])
            for i in overlapping(req.mm_inputs, c, end):
                mm = req.mm_inputs[i]
                s, e = max(c, mm.offset), min(end, mm.end)
                idx.append(np.arange(s, e) - c + starts[k])
                embeds.append(self.cache[(rid, i)][s - mm.offset:e - mm.offset])
                if mm.end <= end:
                    del self.cache[(rid, i)]
            if end >= req.mm_inputs[-1].end:
                self.active.discard(rid)
        if not idx:
            return None
        return self._upload(np.concatenate(idx)), torch.cat(embeds)

    def _upload(self, a: np.ndarray) -> torch.Tensor:
        """Host array -> device tensor; through pinned memory where the device has it, so the
        host does not wait for the device (async scheduling keeps its overlap)."""
        t = torch.from_numpy(a)
        if self.device.type == "cpu":
            return t
        return t.pin_memory().to(self.device, non_blocking=True) if self.pin_memory else t.to(self.device)

    def _scheduled_active(self, req_ids: list[str]) -> list[tuple[int, str]]:
        """(batch index, id) of the scheduled requests that still have images to compute."""
        if len(self.active) < len(req_ids):
            index = {rid: k for k, rid in enumerate(req_ids)}
            return sorted((index[r], r) for r in self.active if r in index)
        return [(k, r) for k, r in enumerate(req_ids) if r in self.active]
