"""``GenerationStats``: the figures of one ``LLM.generate`` call (the CLI's summary prints them)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerationStats:
    """Figures of the last ``generate`` call. A step with any prefill token counts as prefill."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0
    output_tokens: int = 0
    steps: int = 0
    seconds: float = 0.0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0
