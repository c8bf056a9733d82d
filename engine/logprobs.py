"""The runner's parallel-list logprobs -> vLLM's ``{token_id: Logprob}`` dicts, with token texts."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

from tokenizers import Tokenizer

from engine.outputs import Logprob, ModelRunnerOutput, SampleLogprobs, TokenLogprobs

if TYPE_CHECKING:
    from engine.scheduler import Scheduler


class LogprobsBuilder:
    """Builds ``TokenLogprobs`` dicts; token texts are decoded once per token id (cached)."""

    def __init__(self, tokenizer: Tokenizer | None) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def decode(self, token_id: int) -> str | None:
        """A token's text on its own (special tokens included), or None without a tokenizer."""
        if self.tokenizer is None:
            return None
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def build(self, lp: SampleLogprobs) -> TokenLogprobs:
        """``lp``: the chosen token first, then the top-k in rank order (it may repeat the chosen one)."""
        chosen = lp.token_ids[0]
        entries = {t: Logprob(v, rank, self.decode(t))
                   for rank, (t, v) in enumerate(zip(lp.token_ids[1:], lp.logprobs[1:]), start=1)}
        entries[chosen] = Logprob(lp.logprobs[0], lp.sampled_rank, self.decode(chosen))
        return TokenLogprobs(entries, chosen)

    def build_all(self, lps: Sequence[SampleLogprobs]) -> tuple[list[TokenLogprobs], float]:
        """Dicts for a sample's tokens and the sum of the chosen tokens' logprobs."""
        out = [self.build(lp) for lp in lps]
        return out, float(sum(lp.logprobs[0] for lp in lps))


def record_prompt_logprobs(scheduler: "Scheduler", out: ModelRunnerOutput) -> None:
    """Store a step's prompt-logprob entries in their requests (a recomputed position, after
    preemption, overwrites its entry)."""
    for rid, (start, entries) in (out.prompt_logprobs or {}).items():
        req = scheduler.get_request(rid)
        if req is not None and req.prompt_logprobs is not None:
            req.prompt_logprobs[start:start + len(entries)] = entries
