"""Chunked prefill, prefix caching and preemption change nothing: greedy outputs through the
whole stack are identical across engine settings, and identical to HF greedy generation."""
import pytest
import torch

from engine import LLM, SamplingParams
from tests.hf_models import _hf_model, cached_hf_model

MAX_TOKENS = 10
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
BASE = dict(device="cpu", dtype="float32", block_size=8, max_model_len=128, num_kv_blocks=128)
SETTINGS = {
    "caching off, one step": dict(enable_prefix_caching=False, max_num_batched_tokens=4096),
    "caching on, one step": dict(max_num_batched_tokens=4096),
    "chunks of 7": dict(max_num_batched_tokens=7),
    "chunks of 16": dict(max_num_batched_tokens=16),
    "chunks of 64": dict(max_num_batched_tokens=64),
    "max_num_seqs=2": dict(max_num_seqs=2, max_num_batched_tokens=64),
    "long prefill threshold": dict(max_num_batched_tokens=64, long_prefill_token_threshold=9),
    "tiny pool (preemption)": dict(num_kv_blocks=12, max_num_batched_tokens=32),
}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    model_dir = cached_hf_model("qwen3", tmp_path_factory)
    g = torch.Generator().manual_seed(7)

    def rand(n):
        return torch.randint(3, 384, (n,), generator=g).tolist()

    a, b = rand(41), rand(26)  # two long shared prefixes
    prompts = [a + rand(5), rand(13), a + rand(9), b + rand(3), a, b + rand(17), rand(4), a + rand(1)]
    hf = _hf_model(model_dir)
    hf.generation_config.eos_token_id = None
    ref = [hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                       pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    return model_dir, prompts, ref


@pytest.mark.parametrize("name", SETTINGS)
def test_outputs_identical_to_hf(case, name):
    model_dir, prompts, ref = case
    llm = LLM(model=model_dir, **{**BASE, **SETTINGS[name]})
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    stats = llm.scheduler.stats()
    if name == "tiny pool (preemption)":
        assert stats.num_preemptions > 0, "the pool was meant to force preemption"
    cached = [o.num_cached_tokens for o in outs]
    if SETTINGS[name].get("enable_prefix_caching", True):
        assert sum(cached) > 0 and stats.prefix_cache_hits > 0, cached
    else:
        assert cached == [0] * len(prompts)
    # everything was given back: the pool is whole again
    assert llm.scheduler.kv.num_free_blocks == llm.num_kv_blocks - 1
    assert llm.runner.input_batch.num_active == 0 and not llm.runner.requests


def test_second_generate_hits_the_cache(case):
    model_dir, prompts, ref = case
    llm = LLM(model=model_dir, **BASE)
    llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    out = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == (len(prompts[0]) - 1) // 8 * 8  # full blocks, never the last token
    assert out.outputs[0].token_ids == ref[0]
