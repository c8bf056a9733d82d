"""Piecewise graphs on the CPU: the token-wise pieces compiled with torch.compile (no graphs
here), attention eager between them. Greedy tokens equal ``enforce_eager`` for every family,
over chunked prefill and mixed prefill+decode steps; the conformance suite runs with it on."""
import pytest
import torch
from torch._dynamo.utils import counters

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from runners.cpu import CPURunner
from runners.piecewise import PiecewiseModel
from runners.testing import RunnerConformance
from tests.hf_models import FAMILIES, cached_hf_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
# chunks of 24 tokens: long prompts split, decodes ride beside other requests' chunks
ARGS = dict(device="cpu", dtype="float32", block_size=8, max_model_len=128, num_kv_blocks=96,
            max_num_batched_tokens=24, max_num_seqs=4)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in (37, 5, 19, 50, 1)]


@pytest.mark.parametrize("family", FAMILIES)
def test_piecewise_equals_eager(family, tmp_path_factory):
    model_dir = cached_hf_model(family, tmp_path_factory)
    outs = {}
    for name, extra in (("eager", dict(enforce_eager=True)), ("piecewise", dict(use_piecewise_graph=True))):
        llm = LLM(model=model_dir, **ARGS, **extra)
        try:
            outs[name] = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY)]
            if name == "piecewise":
                assert isinstance(llm.runner.graphs.piecewise, PiecewiseModel), "the steps ran the pieces"
                assert counters["stats"]["unique_graphs"] > 0, "torch.compile compiled them"
                assert "piecewise" in llm.info.plan
        finally:
            llm.shutdown()
    assert outs["piecewise"] == outs["eager"]


def test_piecewise_over_two_tensor_parallel_ranks(tmp_path_factory):
    """The all-reduces inside the pieces run eagerly between compiled parts (gloo here)."""
    model_dir = cached_hf_model("qwen2", tmp_path_factory)
    prompts = _prompts()[:3]
    eager = LLM(model=model_dir, **ARGS, enforce_eager=True)
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY)]
    eager.shutdown()
    tp = LLM(model=model_dir, **ARGS, tensor_parallel_size=2, use_piecewise_graph=True)
    try:
        assert "piecewise" in tp.info.plan
        assert [o.outputs[0].token_ids for o in tp.generate(prompts, GREEDY)] == want
    finally:
        tp.shutdown()


def test_plan_from_config():
    cfg = dict(device="cpu", num_kv_blocks=8, max_model_len=64)
    plan = CPURunner(EngineConfig(**cfg, use_piecewise_graph=True)).plan
    assert plan.use_piecewise_graph and plan.tokenwise_graph_batch_sizes == () and not plan.has_graphs
    assert "without graphs" in plan.describe()
    eager = CPURunner(EngineConfig(**cfg, use_piecewise_graph=True, enforce_eager=True)).plan
    assert not eager.use_piecewise_graph and "enforce_eager" in eager.describe()
    with pytest.raises(ValueError, match="tokenwise_graph_batch_sizes .* use_piecewise_graph=True"):
        EngineConfig(**cfg, tokenwise_graph_batch_sizes=[8])


class TestCPURunnerPiecewise(RunnerConformance):
    runner_cls = CPURunner
    device = "cpu"
    engine_args = {"use_piecewise_graph": True}
