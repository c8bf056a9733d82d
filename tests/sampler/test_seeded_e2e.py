"""Seeded requests through the offline API give the same tokens alone, batched, under chunked
prefill and after preemption (tiny random default model on the CPU)."""
import pytest

from engine import LLM, SamplingParams

pytestmark = pytest.mark.cpu

PROMPTS = [[(7 * i + 3 * j) % 300 + 1 for j in range(n)] for i, n in enumerate([13, 9, 21, 17, 11, 15])]
COMMON = dict(max_tokens=12, ignore_eos=True)
PARAMS = [
    SamplingParams(seed=11, temperature=0.9, top_k=40, **COMMON),
    SamplingParams(seed=22, top_p=0.8, **COMMON),
    SamplingParams(seed=33, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3,
                   repetition_penalty=1.2, **COMMON),
    SamplingParams(seed=44, temperature=1.3, logprobs=2, **COMMON),
    SamplingParams(temperature=0.0, **COMMON),
    SamplingParams(**COMMON),  # unseeded: reproducible for one engine seed and admission order
]
SEEDED = [i for i, p in enumerate(PARAMS) if p.seed is not None or p.greedy]


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def batched() -> tuple[LLM, list[list[int]]]:
    llm = LLM(model=None, device="cpu", max_num_seqs=8, seed=0)
    return llm, _tokens(llm, PROMPTS, PARAMS)


def test_alone_equals_batched(batched):
    llm, together = batched
    assert all(len(t) == 12 for t in together)
    for i in SEEDED:
        assert _tokens(llm, [PROMPTS[i]], [PARAMS[i]])[0] == together[i], f"request {i}"
    # the same requests in another order, next to other requests
    order = [3, 1, 5, 0, 2, 4]
    shuffled = _tokens(llm, [PROMPTS[i] for i in order] + [PROMPTS[0]],
                       [PARAMS[i] for i in order] + [SamplingParams(seed=5, **COMMON)])
    for pos, i in enumerate(order):
        if i in SEEDED:
            assert shuffled[pos] == together[i], f"request {i}"


def test_seeded_requests_differ_from_each_other(batched):
    _, together = batched
    assert len({tuple(t) for t in together}) == len(together)


@pytest.mark.parametrize("engine_args", [
    dict(max_num_batched_tokens=7),  # chunked prefill
    dict(num_kv_blocks=5, enable_prefix_caching=False),  # preemption (4 usable blocks of 16)
    dict(num_kv_blocks=5, max_num_batched_tokens=7),  # both
], ids=["chunked", "preempted", "chunked+preempted"])
def test_chunked_and_preempted_equal_batched(batched, engine_args):
    llm = LLM(model=None, device="cpu", max_num_seqs=8, seed=0, **engine_args)
    got = _tokens(llm, PROMPTS, PARAMS)
    if "num_kv_blocks" in engine_args:
        assert llm.scheduler.num_preemptions > 0
    # a fresh engine with the same seed admits in the same order: unseeded requests match too
    assert got == batched[1]
