"""The plain-data contracts between scheduler, runner and user. No torch types here."""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.multimodal import MultiModalInput
from engine.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the runner has not seen (or must forget and re-add)."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # > 0 on a prefix-cache hit
    mm_inputs: tuple[MultiModalInput, ...] = ()  # images, by placeholder offset


@dataclass
class CachedRequestData:
    """Requests the runner already holds, as parallel lists.

    For a request resumed after preemption ``new_block_ids`` is its whole block table
    (replace, not append); otherwise the blocks added since the last step (maybe empty).
    """

    req_ids: list[str] = field(default_factory=list)
    resumed_from_preemption: list[bool] = field(default_factory=list)
    new_block_ids: list[list[int]] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.req_ids)


@dataclass
class SchedulerOutput:
    """One step's decision. Batch order = new requests after cached ones, as listed."""

    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: set[str] = field(default_factory=set)
    # Preempted since the last step: the runner drops their rows (keeps their tokens).
    preempted_req_ids: set[str] = field(default_factory=set)

    @classmethod
    def empty(cls) -> "SchedulerOutput":
        return cls([], CachedRequestData(), {}, 0)


@dataclass
class SampleLogprobs:
    """Logprobs for one generated token: the sampled token first, then the top-n."""

    token_ids: list[int]
    logprobs: list[float]
    sampled_rank: int  # 1 = most likely


@dataclass
class ModelRunnerOutput:
    """Results in batch order. ``sampled_token_ids[i]`` is empty for a partial prefill.

    ``prompt_logprobs``: for requests that asked for them and computed prompt tokens this step,
    ``req_id -> (index of the first prompt token covered, one entry per token)``; entry ``j`` is
    the logprobs of prompt token ``start + j`` (>= 1) given the tokens before it.
    """

    req_ids: list[str]
    sampled_token_ids: list[list[int]]
    logprobs: list[SampleLogprobs | None] | None = None
    prompt_logprobs: dict[str, tuple[int, list[SampleLogprobs]]] | None = None


@dataclass
class Logprob:
    """One token's log probability, its rank in the distribution (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


class TokenLogprobs(dict):
    """``dict[int, Logprob]`` for one position: the top-k tokens then, if not among them, the
    sampled (or actual prompt) token. ``token_ids``, ``logprobs`` and ``sampled_rank`` keep the
    parallel-list view of earlier releases (the chosen token first)."""

    def __init__(self, entries: dict[int, Logprob], chosen: int) -> None:
        super().__init__(entries)
        self.chosen = chosen

    @property
    def token_ids(self) -> list[int]:
        return [self.chosen] + [t for t in self if t != self.chosen]

    @property
    def logprobs(self) -> list[float]:
        return [self[t].logprob for t in self.token_ids]

    @property
    def sampled_rank(self) -> int | None:
        return self[self.chosen].rank


@dataclass
class CompletionOutput:
    """One sample of a request. ``logprobs`` (when asked for): one dict per generated token;
    ``cumulative_logprob``: the sum of the sampled tokens' logprobs (raw distribution)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None

    def finished(self) -> bool:
        """Whether this sample has finished (a method, as in vLLM)."""
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Timestamps (``time.perf_counter`` seconds) of one request inside ``generate``."""

    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_output_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class RequestOutput:
    """A prompt's results: ``outputs`` holds its ``n`` samples (``CompletionOutput.index``
    0..n-1). ``prompt_logprobs`` (when asked for): None for the first prompt token, then a dict
    per token. ``finished`` once every sample has finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    prompt_logprobs: list[TokenLogprobs | None] | None = None
