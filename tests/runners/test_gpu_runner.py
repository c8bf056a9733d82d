"""GPURunner on a CUDA GPU: conformance (float32, exact greedy), CUDA graphs vs eager, HF parity in
bf16, and KV sizing from the memory profile."""
import copy

import pytest
import torch

from engine import LLM, SamplingParams
from runners.testing import RunnerConformance
from tests.hf_models import _hf_model, make_hf_model

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from runners.gpu import GPURunner  # noqa: E402

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (int(k),), generator=g).tolist() for k in torch.randint(5, 60, (n,), generator=g)]


class TestGPURunnerTriton(RunnerConformance):
    runner_cls = GPURunner
    device = "cuda"
    engine_args = {"attention_backend": "triton"}


class TestGPURunnerPiecewise(RunnerConformance):
    runner_cls = GPURunner
    device = "cuda"
    engine_args = {"attention_backend": "triton", "use_piecewise_graph": True,
                   "tokenwise_graph_batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128]}


def test_piecewise_graphs_equal_eager():
    """Chunked prefill and mixed steps replay the pieces' graphs; tokens equal eager's (float32)."""
    args = dict(model=None, device="cuda", dtype="float32", attention_backend="triton", max_num_seqs=16,
                max_model_len=512, num_kv_blocks=256, max_num_batched_tokens=48)
    pw = LLM(**args, use_piecewise_graph=True, tokenwise_graph_batch_sizes=[8, 16, 32, 48])
    pieces = pw.runner.graphs.piecewise
    assert pieces is not None and len(pieces.graphs) == 4 * (pw.model_config.num_hidden_layers + 1)
    replays = []
    for g in pieces.graphs.values():  # count replays of the captured pieces
        g.replay = (lambda f: lambda: replays.append(1) or f())(g.replay)
    prompts = _prompts(11, seed=5)
    a = [o.outputs[0].token_ids for o in pw.generate(prompts, GREEDY)]
    assert replays, "mixed and prefill steps replayed piecewise graphs"
    pw.shutdown()
    eager = LLM(**args, enforce_eager=True)
    assert a == [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY)]


def test_graphs_captured_and_equal_to_eager():
    args = dict(model=None, device="cuda", dtype="float32", attention_backend="triton", max_num_seqs=16,
                max_model_len=512, num_kv_blocks=256)
    graphs = LLM(**args)
    assert graphs.runner.graphs.full, "decode graphs were captured"
    eager = LLM(**args, enforce_eager=True)
    assert not eager.runner.graphs.num_graphs
    prompts = _prompts(11)
    a = [o.outputs[0].token_ids for o in graphs.generate(prompts, GREEDY)]
    b = [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY)]
    assert a == b


@pytest.mark.parametrize("backend", ["triton", "flash"])
def test_bf16_runner_matches_hf(backend, tmp_path_factory):
    """Greedy tokens of the first steps equal HF's (bf16 both), logits close."""
    try:
        model_dir = make_hf_model("llama3", tmp_path_factory.mktemp("llama3_d32"), hidden_size=256,
                                  num_attention_heads=8, intermediate_size=512)  # head_dim 32
        llm = LLM(model=model_dir, device="cuda", dtype="bfloat16",
                  attention_backend=backend, max_model_len=256, num_kv_blocks=128)
    except RuntimeError as e:
        pytest.skip(str(e))
    hf32 = copy.deepcopy(_hf_model(llm.config.model)).to("cuda")
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    logits = []
    compute = llm.runner.model.compute_logits
    llm.runner.model.compute_logits = lambda h: logits.append(compute(h)) or logits[-1]
    prompt = _prompts(1, seed=3)[0]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))[0]
    ids = torch.tensor([prompt + out.outputs[0].token_ids], device="cuda")
    with torch.no_grad():
        ref = hf32(ids).logits[0, len(prompt) - 1:-1].float()
        hf_bf16 = hf16(ids).logits[0, len(prompt) - 1:-1].float()
    ours = torch.cat(logits).float()
    assert out.outputs[0].token_ids[:2] == ref.argmax(-1)[:2].tolist()
    err, hf_err = ((ours - ref).norm() / ref.norm()).item(), ((hf_bf16 - ref).norm() / ref.norm()).item()
    print(f"\nbf16 logits vs fp32 ({backend}): ours {err:.2e}, HF bf16 {hf_err:.2e}")
    assert err <= 1.5 * hf_err + 1e-3, f"ours {err:.3e} vs HF bf16 {hf_err:.3e} (both against fp32)"


def test_kv_sizing_from_memory_profile():
    llm = LLM(model=None, device="cuda", dtype="bfloat16", gpu_memory_utilization=0.5, max_model_len=2048)
    prof, spec = llm.runner.memory_profile, llm.runner.kv_cache_spec
    print(f"\nKV sizing: {prof.describe()} -> {llm.num_kv_blocks} blocks of {spec.bytes_per_block} B")
    assert prof.weights > 0 and prof.peak_activation > 0 and prof.total > 0
    assert llm.num_kv_blocks == prof.kv_budget // spec.bytes_per_block
    assert llm.num_kv_blocks * spec.bytes_per_block <= 0.5 * prof.total


def test_cache_too_small_fails_at_start_with_the_figures():
    with pytest.raises(RuntimeError, match="max_model_len=2048.*kv_cache_memory_bytes"):
        LLM(model=None, device="cuda", max_model_len=2048, kv_cache_memory_bytes=2**20)


def test_vl_decode_replays_graphs_and_equals_eager(tmp_path_factory):
    """A Qwen2-VL model: steps with images run eagerly, steady decoding replays the decode graphs
    (plain positions at index + delta); greedy tokens equal eager's (float32)."""
    from tests.hf_models import make_hf_vl_model
    from tests.models.test_qwen2_vl_vs_hf import PROMPTS, as_prompt

    model_dir = make_hf_vl_model("qwen2_5_vl", tmp_path_factory.mktemp("vl_d32"), num_attention_heads=2,
                                 num_key_value_heads=1, rope_parameters={  # head_dim 32: Triton runs it
                                     "rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]})
    prompts = [as_prompt(ids, images) for ids, images in PROMPTS.values()]
    args = dict(model=model_dir, device="cuda", dtype="float32", max_model_len=512, num_kv_blocks=128,
                attention_backend="triton")
    graphs = LLM(**args)
    assert graphs.runner.graphs.full, f"decode graphs were captured: {graphs.info.plan}"
    replays = []
    for n, replay in graphs.runner.graphs.full.items():
        replay.graph.replay = (lambda f: lambda: replays.append(1) or f())(replay.graph.replay)
    a = [o.outputs[0].token_ids for o in graphs.generate(prompts, GREEDY)]
    assert replays, "decode steps of a VL model replayed graphs"
    graphs.shutdown()
    eager = LLM(**args, enforce_eager=True)
    assert a == [o.outputs[0].token_ids for o in eager.generate(prompts, GREEDY)]


def test_pdl_graphs_equal_launches_without_pdl(monkeypatch):
    """bf16 decode at batch 1 (GEMV kernels, graphs replayed) and 3, prefill and mixed steps: with
    programmatic dependent launch (sm90+) the logits equal those of the same kernels launched
    without it (RUNNERS_PDL=0) bit for bit - same arithmetic, only when each kernel may start
    differs - so no GEMV reads its input, or writes, before the previous kernel is done."""
    import models.layers
    from platforms.triton_support import PDL_ENV_VAR, launch_pdl

    calls = []
    gemv = models.layers.gemv
    monkeypatch.setattr(models.layers, "gemv", lambda *a, **k: calls.append(1) or gemv(*a, **k))
    args = dict(model=None, device="cuda", dtype="bfloat16", attention_backend="triton", max_num_seqs=4,
                max_model_len=512, num_kv_blocks=256, max_num_batched_tokens=64)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    results = {}
    hopper = torch.cuda.get_device_capability()[0] >= 9 and not torch.version.hip
    for pdl in ("1", "0"):
        monkeypatch.setenv(PDL_ENV_VAR, pdl)
        assert launch_pdl(torch.device("cuda")) == (hopper and pdl == "1")
        llm = LLM(**args)
        assert llm.runner.graphs.full, "decode graphs were captured"
        seen = []
        compute = llm.runner.model.compute_logits
        llm.runner.model.compute_logits = lambda h: seen.append(compute(h)) or seen[-1]
        tokens = [o.outputs[0].token_ids for prompts in (_prompts(1, seed=7), _prompts(3, seed=8))
                  for o in llm.generate(prompts, params)]
        results[pdl] = tokens, torch.cat(seen).float().cpu()
        llm.shutdown()
    assert calls, "batch-1 steps took the GEMV kernels"
    assert results["1"][0] == results["0"][0]
    assert torch.equal(results["1"][1], results["0"][1])
