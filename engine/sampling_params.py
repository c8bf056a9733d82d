"""Per-request sampling parameters, validated at construction and when a request is made."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

_MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How one request is sampled and when it stops (vLLM's names and meanings).

    ``temperature == 0`` (or ``top_k == 1``) means greedy. ``top_k <= 0`` and
    ``top_p == 1`` and ``min_p == 0`` disable those filters. ``max_tokens=None`` generates
    until an EOS/stop condition or ``max_model_len``. ``logprobs=k`` returns, for every
    generated token, a ``{token_id: Logprob}`` dict of the top-k of the raw (pre-penalty,
    pre-temperature) distribution plus the sampled token; ``prompt_logprobs=k`` the same
    for every prompt token after the first (such a request skips prefix-cache hits: their
    logits were never computed). ``n`` samples are drawn per prompt, sharing its KV blocks
    through prefix caching; sample ``i`` of a seeded request uses ``seed + i``.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field (ValueError naming it). Run at construction and again when a request
        is made, so a field changed after construction (e.g. ``temperature = nan``) is caught."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of token ids >= 0, got {self.stop_token_ids!r}")
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        _check_number("temperature", self.temperature, 0.0, math.inf, "a finite number >= 0")
        _check_int("top_k", self.top_k, -1, None, "an integer >= -1 (0 or -1 disables it)")
        _check_number("top_p", self.top_p, 0.0, 1.0, "a number in (0, 1]", open_low=True)
        _check_number("min_p", self.min_p, 0.0, 1.0, "a number in [0, 1]")
        _check_number("presence_penalty", self.presence_penalty, -2.0, 2.0, "a number in [-2, 2]")
        _check_number("frequency_penalty", self.frequency_penalty, -2.0, 2.0, "a number in [-2, 2]")
        _check_number("repetition_penalty", self.repetition_penalty, 0.0, math.inf,
                      "a finite number > 0", open_low=True)
        _check_int("n", self.n, 1, None, "an integer >= 1")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - self.n, "None or an integer in [0, 2**63)" if self.n == 1 else
                       f"None or an integer in [0, 2**63 - n] (sample i uses seed + i; n={self.n})")
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1, None, "None (until max_model_len) or an integer >= 1")
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens,
                   "an integer >= 0" if self.max_tokens is None else f"an integer in [0, max_tokens={self.max_tokens}]")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0, None, "a list of token ids >= 0")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), 0, _MAX_LOGPROBS, f"None or an integer in [0, {_MAX_LOGPROBS}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def sample(self, i: int) -> "SamplingParams":
        """The parameters of sample ``i`` of ``n``: one sample, seed ``seed + i`` when seeded."""
        if not 0 <= i < self.n:
            raise ValueError(f"sample index must be in [0, n={self.n}), got {i}")
        if self.n == 1:
            return self
        return dataclasses.replace(self, n=1, seed=None if self.seed is None else self.seed + i)

    @classmethod
    def broadcast(cls, params: "SamplingParams | Sequence[SamplingParams] | None",
                  n: int) -> list["SamplingParams"]:
        """One SamplingParams per prompt: None -> defaults, one -> shared, a list -> checked length."""
        if params is None:
            params = cls()
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"sampling_params entries must be SamplingParams, got {type(p).__name__}")
        return params


def _check_number(name: str, value: object, lo: float, hi: float, allowed: str,
                  open_low: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if open_low else value >= lo) and value <= hi
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _check_int(name: str, value: object, lo: int, hi: int | None, allowed: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
