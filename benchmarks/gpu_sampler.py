"""Sampler timings per case on any device: ``python benchmarks/gpu_sampler.py --device cuda``.

``sampler_table(device)`` is the entry point for the GPU benchmark script; it returns
``[(case, median ms, p90 ms)]`` for ``num_rows`` requests over a ``vocab``-sized vocabulary.
A timed call is ``Sampler()(logits, md)`` plus a device synchronisation (what a step waits
for before reading the ids back); ``prepare+update`` times the host side and its uploads.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import numpy as np
import torch

from engine.sampling_params import SamplingParams as SP
from runners.sampler import Sampler
from runners.sampling_state import SamplingState

PEN = dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)
CASES: dict[str, Callable[[int], SP]] = {
    "greedy": lambda i: SP(temperature=0.0),
    "random (temperature only)": lambda i: SP(temperature=0.8),
    "top_k=50 top_p=0.9": lambda i: SP(top_k=50, top_p=0.9),
    "top_p=0.9 (no top_k: full sort)": lambda i: SP(top_p=0.9),
    "min_p=0.05": lambda i: SP(min_p=0.05),
    "penalties + top_k/top_p": lambda i: SP(top_k=50, top_p=0.9, **PEN),
    "logprobs=5 + top_k/top_p": lambda i: SP(top_k=50, top_p=0.9, logprobs=5),
    "mixed (4 kinds)": lambda i: [SP(temperature=0.0), SP(top_k=50, top_p=0.9), SP(top_p=0.9),
                                  SP(top_k=20, logprobs=5, **PEN)][i % 4],
}


def build_case(case: str, num_rows: int, vocab: int, device: str | torch.device,
               num_candidates: int | None = None) -> tuple[SamplingState, np.ndarray]:
    """A state whose ``num_rows`` rows hold the case's requests, each with 64 prompt and
    64 generated tokens (so penalties have counts to apply)."""
    st = SamplingState(num_rows, vocab, device, seed=0, eos_token_ids=(0,), num_candidates=num_candidates)
    rng = np.random.default_rng(0)
    for i in range(num_rows):
        st.add_request(i, CASES[case](i), rng.integers(0, vocab, 64).tolist(),
                       rng.integers(0, vocab, 64).tolist())
    return st, np.arange(num_rows)


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize()


def time_case(case: str, num_rows: int = 256, vocab: int = 131072, device: str = "cpu",
              repeats: int = 10, num_candidates: int | None = None) -> list[float]:
    """Seconds per sampler call (after one warm-up), fresh logits every call."""
    dev = torch.device(device)
    st, rows = build_case(case, num_rows, vocab, dev, num_candidates)
    sampler = Sampler()
    base = torch.randn(num_rows, vocab, device=dev, generator=None) * 4
    times = []
    for r in range(repeats + 1):
        logits, md = base.clone(), st.prepare(rows)
        _sync(dev)
        t = time.perf_counter()
        out = sampler(logits, md)
        _sync(dev)
        if r:
            times.append(time.perf_counter() - t)
        st.update(rows, out.sampled_token_ids)
    return times


def time_prepare(num_rows: int = 256, vocab: int = 131072, device: str = "cpu",
                 repeats: int = 20) -> list[float]:
    dev = torch.device(device)
    st, rows = build_case("mixed (4 kinds)", num_rows, vocab, dev)
    sampled = torch.zeros(num_rows, dtype=torch.int64, device=dev)
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        st.prepare(rows)
        st.update(rows, sampled)
        _sync(dev)
        times.append(time.perf_counter() - t)
    return times


def sampler_table(device: str = "cuda", num_rows: int = 256, vocab: int = 131072,
                  repeats: int = 20) -> list[tuple[str, float, float]]:
    """[(case, median ms, p90 ms)] for every case, a smaller candidate count, and prepare."""
    def row(name: str, ts: list[float]) -> tuple[str, float, float]:
        ts = sorted(ts)
        return name, statistics.median(ts) * 1e3, ts[int(0.9 * (len(ts) - 1))] * 1e3
    out = [row(c, time_case(c, num_rows, vocab, device, repeats)) for c in CASES]
    out.append(row("top_k=50 top_p=0.9, 128 candidates",
                   time_case("top_k=50 top_p=0.9", num_rows, vocab, device, repeats, num_candidates=128)))
    out.append(row("top_k=50 top_p=0.9, no candidates (full sort)",
                   time_case("top_k=50 top_p=0.9", num_rows, vocab, device, repeats, num_candidates=0)))
    out.append(row("prepare+update (host, mixed)", time_prepare(num_rows, vocab, device, repeats)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=131072)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args()
    table = sampler_table(a.device, a.rows, a.vocab, a.repeats)
    print(f"sampler, {a.rows} requests x vocab {a.vocab} on {a.device}")
    print(f"{'case':48s} {'median ms':>10s} {'p90 ms':>10s}")
    for name, med, p90 in table:
        print(f"{name:48s} {med:10.3f} {p90:10.3f}")


if __name__ == "__main__":
    main()
