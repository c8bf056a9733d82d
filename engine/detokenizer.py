"""Incremental detokenization with stop strings (torch-free).

Decoding goes through ``tokenizers``' ``DecodeStream``, which decodes a short window of
recent tokens per step and holds back a tail that ends inside a multi-byte UTF-8 character
(or an incomplete byte-fallback sequence) until the tokens that complete it arrive; so the
cost per step is O(new tokens), and text never contains half a character. ``finish()``
flushes such a tail (rendered with U+FFFD where the bytes stay incomplete).

Stop strings are matched on the decoded text, so one may span tokens. On a match the output
text ends just before it (vLLM's default) and ``stop_string`` names it; tokens after the
one that completed the match are ignored.
"""
from __future__ import annotations

from typing import Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from engine.sampling_params import SamplingParams

_CONTEXT = 5  # prompt tokens decoded as context: a token's text may depend on its left neighbour


class IncrementalDetokenizer:
    """Feed generated ids with ``update``; read ``output_text`` and ``stop_string``.

    ``update`` returns the new text that is safe to stream: it holds back the last
    ``len(longest stop string) - 1`` characters, which might still become a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int] = (),
                 sampling_params: SamplingParams | None = None, *, stop: Sequence[str] | None = None,
                 skip_special_tokens: bool = True) -> None:
        if stop is None:
            stop = sampling_params.stop if sampling_params is not None else ()
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {stop!r}")
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids)[-_CONTEXT:]
        self._stream = DecodeStream(ids=context or None, skip_special_tokens=skip_special_tokens)
        self._done_ids: list[int] = context  # the last few ids whose text is emitted (context)
        self._pending: list[int] = []  # ids fed since the last emitted chunk
        self._chunks: list[str] = []  # the committed text, joined lazily
        self._unsent = ""  # committed text that update/finish has not returned yet
        self._tail = ""  # the last (longest stop - 1) characters, for matches across chunks
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self.stop_string: str | None = None
        self.num_tokens = 0  # tokens consumed (stops at the one that completed a stop string)
        self.finished = False

    @property
    def output_text(self) -> str:
        """The text so far: never half a character, truncated before a matched stop string."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def update(self, token_ids: Sequence[int]) -> str:
        """Consume generated ids (stopping at a stop string); returns new streamable text."""
        if self.stop_string is None and not self.finished:
            for tok in token_ids:
                self.num_tokens += 1
                self._pending.append(tok)
                chunk = self._stream.step(self.tokenizer, tok)
                if chunk is not None:
                    self._done_ids = (self._done_ids + self._pending)[-_CONTEXT:]
                    self._pending = []
                    if self._append(chunk):
                        break
        return self._delta()

    def finish(self) -> str:
        """The request ended: flush an incomplete tail; returns the last streamable text."""
        if not self.finished and self.stop_string is None and self._pending:
            skip = self.skip_special_tokens
            before = self.tokenizer.decode(self._done_ids, skip_special_tokens=skip)
            after = self.tokenizer.decode(self._done_ids + self._pending, skip_special_tokens=skip)
            self._append(after[len(before):] if after.startswith(before) else after)
            self._pending = []
        self.finished = True
        return self._delta()

    def _append(self, chunk: str) -> bool:
        """Add decoded text; True when a stop string matched (the text is then truncated)."""
        if not chunk:
            return False
        window = self._tail + chunk
        match = min(((window.find(s), k) for k, s in enumerate(self.stop) if s in window), default=None)
        if match is not None:  # the earliest match; the first listed on a tie
            i, self.stop_string = match[0], self.stop[match[1]]
            keep = window[len(self._tail):i] if i >= len(self._tail) else ""
            self._drop(max(len(self._tail) - i, 0))  # held back, so never streamed yet
            chunk = keep
        self._chunks.append(chunk)
        self._unsent += chunk
        self._tail = window[-self._hold:] if self._hold else ""
        return match is not None

    def _drop(self, n: int) -> None:
        """Remove the last ``n`` committed characters (all still in ``_unsent``)."""
        if n:
            self._unsent = self._unsent[:-n]
            while n:
                last = self._chunks.pop()
                if len(last) > n:
                    self._chunks.append(last[:-n])
                    n = 0
                else:
                    n -= len(last)

    def _delta(self) -> str:
        if self.finished or self.stop_string is not None:
            out, self._unsent = self._unsent, ""
        else:
            cut = max(len(self._unsent) - self._hold, 0)
            out, self._unsent = self._unsent[:cut], self._unsent[cut:]
        return out
