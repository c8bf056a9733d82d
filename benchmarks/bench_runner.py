"""CPU-side costs of one runner step (pytest-benchmark): ``_update_states`` + ``_prepare_inputs``
and sampling prep, for 1/64/256 requests, decode-only and mixed (one 2,048-token prefill chunk
beside the decodes). No model runs: this is the host work around the forward pass.

Run:    python -m pytest benchmarks/bench_runner.py --benchmark-enable --benchmark-columns=median,mean,min,rounds
Goal on the 2-core CI machine: under 150 us for 256 decodes and for 2,048 + 255.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.outputs import CachedRequestData, NewRequestData, SchedulerOutput
from engine.sampling_params import SamplingParams
from models.default import default_model_dir
from runners.cpu import CPURunner

pytestmark = pytest.mark.cpu

PROMPT, CHUNK, MAX_LEN, BS = 512, 2048, 4096, 16


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> CPURunner:
    # The default model's config with room for MAX_LEN positions (no weights are read).
    config = json.loads((pathlib.Path(default_model_dir()) / "config.json").read_text())
    model = tmp_path_factory.mktemp("model")
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": MAX_LEN}))
    cfg = EngineConfig(model=str(model), device="cpu", dtype="float32", max_model_len=MAX_LEN, block_size=BS,
                       max_num_seqs=256, max_num_batched_tokens=CHUNK + 255, num_kv_blocks=2)
    return CPURunner(cfg)  # no model, no KV cache: only the host-side bookkeeping is exercised


def _admit(runner: CPURunner, n: int, prefill: bool) -> SchedulerOutput:
    """Admit n requests (the first a long prompt mid-prefill when ``prefill``); return a step's output."""
    for rid in list(runner.requests):
        runner._update_states(SchedulerOutput([], CachedRequestData(), {}, 0, finished_req_ids={rid}))
    rng = np.random.default_rng(0)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50)
    news, sched, cached = [], {}, CachedRequestData()
    for i in range(n):
        long = prefill and i == 0
        prompt = rng.integers(0, 32000, (CHUNK + 512 if long else PROMPT)).tolist()
        computed = 0 if long else PROMPT
        nb = -(-(len(prompt) + 64) // BS)
        news.append(NewRequestData(f"r{i}", prompt, params, list(range(1 + i * nb, 1 + (i + 1) * nb)), computed))
        sched[f"r{i}"] = CHUNK if long else 1
        cached.req_ids.append(f"r{i}")
        cached.resumed_from_preemption.append(False)
        cached.new_block_ids.append([])
        cached.num_computed_tokens.append(computed)
    runner._update_states(SchedulerOutput(news, CachedRequestData(), {}, 0))
    return SchedulerOutput([], cached, sched, sum(sched.values()))


@pytest.mark.parametrize("kind", ["decode", "mixed"])
@pytest.mark.parametrize("n", [1, 64, 256])
def test_bench_update_and_prepare(benchmark, runner, n: int, kind: str) -> None:  # type: ignore[no-untyped-def]
    so = _admit(runner, n, kind == "mixed")

    def step():  # type: ignore[no-untyped-def]
        runner._update_states(so)
        return runner._prepare_inputs(so)

    step_inputs = benchmark(step)
    assert step_inputs.input_ids.shape[0] == so.total_num_scheduled_tokens
    assert len(step_inputs.sample_rows) == n - (kind == "mixed")


@pytest.mark.parametrize("n", [1, 64, 256])
def test_bench_sampling_prep(benchmark, runner, n: int) -> None:  # type: ignore[no-untyped-def]
    _admit(runner, n, False)
    rows = np.array([runner.requests[f"r{i}"].row for i in range(n)])
    md = benchmark(runner.sampling_state.prepare, rows)
    assert md is not None
