"""Tensor parallelism through the whole engine on the CPU (gloo): two worker processes give
token-for-token the outputs of one rank, with chunked prefill, prefix hits and preemption in the
run, greedy and seeded sampling alike."""
import pytest
import torch

from engine import LLM, SamplingParams
from tests.hf_models import cached_hf_model

# chunks of 16 tokens, a pool small enough to preempt, block-sized shared prefixes
SETTINGS = dict(device="cpu", dtype="float32", block_size=8, max_model_len=96, num_kv_blocks=14,
                max_num_batched_tokens=16, max_num_seqs=4)
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def _prompts(seed: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)

    def rand(n):
        return torch.randint(3, 383, (n,), generator=g).tolist()

    a = rand(24)
    return [a + rand(5), rand(13), a + rand(9), rand(30), a, rand(4)]


def _sampled() -> list[SamplingParams]:
    return [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, min_p=0.02, repetition_penalty=1.1,
                           max_tokens=8, seed=100 + i, ignore_eos=True) for i in range(6)]


def _run(model_dir: str, **args) -> tuple[list[list[int]], list[list[int]], list[int], int]:
    with LLM(model=model_dir, **{**SETTINGS, **args}) as llm:
        greedy = llm.generate(_prompts(), GREEDY, use_tqdm=False)
        preemptions = llm.scheduler.stats().num_preemptions
        sampled = llm.generate(_prompts(8), _sampled(), use_tqdm=False)
        assert llm.scheduler.kv.num_free_blocks == llm.num_kv_blocks - 1, "every block came back"
    return ([o.outputs[0].token_ids for o in greedy], [o.outputs[0].token_ids for o in sampled],
            [o.num_cached_tokens for o in greedy], preemptions)


# qwen3: 8 q / 4 kv heads and q/k norms; qwen2: q/k/v biases; llama3: llama3 rope, 2 kv heads;
# llama_tied: one KV head replicated on both ranks, tied embeddings, o_proj/MLP biases.
@pytest.mark.parametrize("family", ["qwen3", "qwen2", "llama3", "llama_tied"])
def test_two_ranks_match_one(family, tmp_path_factory):
    model_dir = cached_hf_model(family, tmp_path_factory)
    one = _run(model_dir)
    two = _run(model_dir, tensor_parallel_size=2)
    assert two[0] == one[0], "greedy tokens differ between tensor_parallel_size=2 and 1"
    assert two[1] == one[1], "seeded sampled tokens differ between tensor_parallel_size=2 and 1"
    assert two[2] == one[2] and sum(two[2]) > 0, f"prefix-cache hits expected in both runs: {two[2]}"
    assert two[3] > 0 and one[3] > 0, "the pool was meant to force preemption"


def test_a_gguf_file_splits_over_two_ranks(tmp_path_factory):
    """Each rank dequantizes the whole file and keeps its shard; the tokens equal one rank's."""
    from tests.gguf_models import write_gguf

    hf_dir = cached_hf_model("qwen2", tmp_path_factory)
    gguf = write_gguf(hf_dir, str(tmp_path_factory.mktemp("gguf_tp") / "m.Q8_0.gguf"), "Q8_0")
    one, two = _run(gguf), _run(gguf, tensor_parallel_size=2)
    assert two[:2] == one[:2]


def test_a_vision_language_model_splits_its_decoder_over_two_ranks(tmp_path_factory):
    """Qwen2.5-VL: the decoder is sharded, the vision tower replicated; image inputs cross the
    process boundary as numpy; 16-token chunks split the image; the second prompt (another image)
    shares only the text before it."""
    from tests.models.test_qwen2_vl_vs_hf import IMAGE, image, text

    model_dir = cached_hf_model("qwen2_5_vl", tmp_path_factory)
    ids = text(1, 9) + IMAGE + text(2, 5)
    prompts = [{"prompt_token_ids": ids, "multi_modal_data": {"image": [image(1, 120, 80)]}},
               {"prompt_token_ids": ids, "multi_modal_data": {"image": [image(2, 120, 80)]}}, text(3, 7)]
    outs = []
    for tp in (1, 2):
        with LLM(model=model_dir, **{**SETTINGS, "tensor_parallel_size": tp}) as llm:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)])
    assert outs[1] == outs[0]
