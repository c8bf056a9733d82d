"""A request as the scheduler tracks it."""
from __future__ import annotations

import enum

from engine.multimodal import MultiModalInput
from engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {3: "stop", 4: "length", 5: "abort"}.get(int(self))


class Request:
    """Prompt + generated tokens, progress and status. ``num_computed_tokens`` counts
    tokens whose KV is in the cache (prefix hits included)."""

    __slots__ = ("request_id", "prompt_token_ids", "sampling_params", "eos_token_ids",
                 "cache_salt", "output_token_ids", "all_token_ids", "num_computed_tokens",
                 "num_cached_tokens", "status", "stop_reason", "arrival", "logprobs",
                 "num_preemptions", "block_hashes", "prompt_logprobs", "num_output_placeholders",
                 "mm_inputs")

    def __init__(self, request_id: str, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, eos_token_ids: tuple[int, ...] = (),
                 arrival: int = 0, cache_salt: str | None = None,
                 mm_inputs: tuple[MultiModalInput, ...] = ()) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.cache_salt = cache_salt
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # set at the first scheduling (prefix-cache hits)
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.arrival = arrival
        self.logprobs: list = []
        # Per prompt token (None for the first, and until computed), when prompt_logprobs is asked for.
        self.prompt_logprobs: list | None = (None if sampling_params.prompt_logprobs is None
                                             else [None] * len(prompt_token_ids))
        self.num_preemptions = 0
        self.block_hashes: list[bytes] = []  # chained hashes of full blocks (engine/hashing.py)
        # Tokens scheduled to be sampled whose ids have not arrived yet (async scheduling: the
        # next step computes them; their KV slots are allocated, their ids are still unknown).
        self.num_output_placeholders = 0
        self.mm_inputs = tuple(mm_inputs)  # images, by placeholder offset (engine/multimodal.py)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop(self, max_model_len: int) -> bool:
        """After appending a token: set a finished status if a stop condition holds."""
        sp = self.sampling_params
        n_out = len(self.output_token_ids)
        last = self.output_token_ids[-1]
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and last in self.eos_token_ids:
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, None
                return True
            if last in sp.stop_token_ids:
                self.status, self.stop_reason = RequestStatus.FINISHED_STOPPED, last
                return True
        if (sp.max_tokens is not None and n_out >= sp.max_tokens) or len(self.all_token_ids) >= max_model_len:
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, "
                f"computed={self.num_computed_tokens}/{self.num_tokens})")
