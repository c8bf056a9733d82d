"""The persistent batch: per-request rows of numpy state, reused across steps."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.sampling_params import SamplingParams


@dataclass
class RequestState:
    """What the runner remembers of a request between steps (rows come and go)."""

    req_id: str
    num_prompt_tokens: int
    sampling_params: SamplingParams
    row: int | None
    seed: int | None = None  # drawn at first admission, kept across preemption
    # Token ids while the request holds no row (new, or preempted): prompt + outputs.
    parked_tokens: np.ndarray | None = None


class InputBatch:
    """Rows ``[max_num_reqs]`` of token ids, progress and block tables.

    A request keeps its row from admission to finish or preemption, so a decode step
    only writes one token and a count per request; freed rows are reused.
    """

    def __init__(self, max_num_reqs: int, max_model_len: int, max_blocks_per_req: int) -> None:
        self.max_num_reqs = max_num_reqs
        self.max_model_len = max_model_len
        self.token_ids = np.zeros((max_num_reqs, max_model_len), dtype=np.int32)
        self.num_tokens = np.zeros(max_num_reqs, dtype=np.int32)
        self.num_computed = np.zeros(max_num_reqs, dtype=np.int32)
        self.block_table = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int32)
        self._free_rows = list(range(max_num_reqs - 1, -1, -1))  # pop() yields low rows first

    @property
    def num_active(self) -> int:
        return self.max_num_reqs - len(self._free_rows)

    def add(self, tokens: np.ndarray | list[int], block_ids: list[int], num_computed: int) -> int:
        if not self._free_rows:
            raise RuntimeError(f"persistent batch is full ({self.max_num_reqs} rows = max_num_seqs)")
        n = len(tokens)
        if n > self.max_model_len:
            raise ValueError(f"request has {n} tokens, more than max_model_len={self.max_model_len}")
        row = self._free_rows.pop()
        self.token_ids[row, :n] = tokens
        self.num_tokens[row] = n
        self.num_computed[row] = num_computed
        self.num_blocks[row] = 0
        self.set_blocks(row, block_ids)
        return row

    def set_blocks(self, row: int, block_ids: list[int]) -> None:
        n = len(block_ids)
        if n > self.block_table.shape[1]:
            raise ValueError(f"block table of {n} blocks exceeds {self.block_table.shape[1]} per request")
        self.block_table[row, :n] = block_ids
        self.num_blocks[row] = n

    def append_blocks(self, row: int, block_ids: list[int]) -> None:
        if block_ids:
            start = int(self.num_blocks[row])
            end = start + len(block_ids)
            if end > self.block_table.shape[1]:
                raise ValueError(f"block table of {end} blocks exceeds {self.block_table.shape[1]} per request")
            self.block_table[row, start:end] = block_ids
            self.num_blocks[row] = end

    def tokens(self, row: int) -> np.ndarray:
        return self.token_ids[row, :self.num_tokens[row]].copy()

    def remove(self, row: int) -> None:
        self.num_tokens[row] = 0
        self.num_computed[row] = 0
        self.num_blocks[row] = 0
        self._free_rows.append(row)

    def append_placeholders(self, rows: np.ndarray) -> np.ndarray:
        """One more token at the end of each row, its id not known yet (-1 until the step's
        output writes it); returns the positions."""
        ends = self.num_tokens[rows]
        if (ends >= self.max_model_len).any():
            raise ValueError(f"a request sampled past max_model_len={self.max_model_len}")
        self.token_ids[rows, ends] = -1
        self.num_tokens[rows] = ends + 1
        return ends
