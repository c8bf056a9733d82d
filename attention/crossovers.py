"""Where one attention kernel overtakes another: the measured crossovers per GPU family
(``crossovers.json`` next to this file) and the per-step route they decide.

A step's rows are decode rows (query length 1) and prefill rows (query length >= 2). The
composite backend (``attention.composite``) runs a step in one of three ways:

* ``"decode"``: the whole step on the decode kernel (Triton's split-KV kernel handles prefill
  rows too, in one pair of launches);
* ``"prefill"``: the whole step on the prefill kernel (e.g. flash-attn-4);
* ``"split"``: decode rows on the decode kernel, prefill rows on the prefill kernel.

Rule (``choose_route``), from two thresholds of a ``Crossover``: prefill rows go to the prefill
kernel when they average at least ``prefill_min_query_len`` tokens (short chunks, e.g. a
suffix over a cached prefix, are better on the decode kernel); then decode rows go to the decode
kernel when there are at least ``split_min_decode_tokens`` of them, else the prefill kernel takes
them too. A GPU family without an entry (and the CPU) gets ``ROLE_RULE``: every row to the kernel
of its role. ``benchmarks/gpu_attention_crossover.py`` times both kernels over a grid of step
shapes and fits the thresholds with ``fit_crossover``.
"""
from __future__ import annotations

import functools
import json
import pathlib
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

Route = Literal["decode", "prefill", "split"]
ROUTES: tuple[Route, ...] = ("decode", "prefill", "split")
TABLE_PATH = pathlib.Path(__file__).with_name("crossovers.json")


@dataclass(frozen=True)
class StepShape:
    """What the route depends on; host ints only (no device sync)."""

    decode_tokens: int  # rows with query length 1 (one token each)
    prefill_tokens: int  # tokens of rows with query length >= 2
    prefill_reqs: int

    @property
    def prefill_query_len(self) -> float:
        return self.prefill_tokens / self.prefill_reqs if self.prefill_reqs else 0.0


@dataclass(frozen=True)
class Crossover:
    prefill_min_query_len: int
    split_min_decode_tokens: int
    source: str = ""


ROLE_RULE = Crossover(2, 1, "built-in rule (no measurement for this device): every row to the kernel "
                            "of its role")


def choose_route(shape: StepShape, xo: Crossover) -> Route:
    """The route of one step under ``xo`` (see the module docstring)."""
    if shape.prefill_tokens == 0 or shape.prefill_query_len < xo.prefill_min_query_len:
        return "decode"
    if shape.decode_tokens == 0 or shape.decode_tokens < xo.split_min_decode_tokens:
        return "prefill"
    return "split"


def load_table(path: pathlib.Path | str = TABLE_PATH) -> dict[str, dict]:
    """GPU family (e.g. ``"sm90"``) -> entry; keys starting with ``_`` are comments."""
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def entry_to_crossover(entry: dict) -> Crossover:
    return Crossover(int(entry["prefill_min_query_len"]), int(entry["split_min_decode_tokens"]),
                     str(entry.get("source", "")))


def family_key(device: torch.device) -> str | None:
    """``"sm<major><minor>"`` for an NVIDIA GPU (read through triton's driver), else None."""
    if device.type != "cuda":
        return None
    from platforms.triton_support import compute_capability
    cc = compute_capability()
    return None if cc is None else f"sm{cc}"


@functools.lru_cache(maxsize=None)
def crossover_for(family: str | None, decode: str, prefill: str,
                  path: str = str(TABLE_PATH)) -> Crossover:
    """The table's entry for ``family`` when it was measured with these two kernels, else
    ``ROLE_RULE``."""
    entry = load_table(path).get(family or "")
    if entry is None or (entry.get("decode"), entry.get("prefill")) != (decode, prefill):
        return ROLE_RULE
    return entry_to_crossover(entry)


# Fitting from measurements ---------------------------------------------------------------
Timed = tuple[StepShape, dict[str, float]]  # a step shape and its time per route (any unit)


def _regret(cases: Sequence[Timed], xo: Crossover) -> float:
    """Sum over cases of (time of the chosen route) / (best time): 1 per case when perfect."""
    total = 0.0
    for shape, times in cases:
        route = choose_route(shape, xo)
        if route == "split" and "split" not in times:
            route = "prefill"
        total += times[route] / min(times.values())
    return total


def fit_crossover(cases: Sequence[Timed], source: str) -> Crossover:
    """Thresholds that route ``cases`` with the least total relative slowdown (every case
    counts alike, short or long). Prefill-only cases need times for "decode" and "prefill",
    mixed ones also "split". Candidates are the grid's own values (and "never"); ties keep
    the smaller threshold."""
    never = 1 << 30
    q_lens = sorted({max(2, int(s.prefill_query_len)) for s, _ in cases if s.prefill_tokens} | {never})
    decodes = sorted({s.decode_tokens for s, _ in cases if s.decode_tokens} | {1, never})
    best = None
    for q in q_lens:
        for d in decodes:
            xo = Crossover(q, d, source)
            cost = _regret(cases, xo)
            if best is None or cost < best[0] - 1e-9:
                best = (cost, xo)
    return best[1]
