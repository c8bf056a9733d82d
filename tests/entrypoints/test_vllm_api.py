"""vLLM's offline API shapes: n samples per prompt, max_tokens=None, logprobs as dict[int, Logprob]
with the sampled token, prompt_logprobs, finished flags, and max_tokens cut by max_model_len."""
import math
import warnings

import pytest
import torch

from engine import LLM, SamplingParams
from engine.outputs import Logprob, TokenLogprobs
from tests.hf_models import cached_hf_model, hf_logits

pytestmark = pytest.mark.cpu

PROMPT = [(5 * j + 3) % 250 + 1 for j in range(40)]  # 2 full blocks of 16, then 8 tokens
SAMPLE = dict(temperature=1.0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", num_kv_blocks=128, max_model_len=96, max_num_seqs=8)


def _tokens(out):
    return [c.token_ids for c in out.outputs]


def test_n_samples_share_the_prompt_blocks_and_use_consecutive_seeds(llm):
    hits = llm.scheduler.kv.num_hit_tokens
    out, = llm.generate([PROMPT], SamplingParams(n=4, seed=7, **SAMPLE), use_tqdm=False)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3] and out.finished and out.request_id.startswith("req-")
    assert all(c.finished() and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(t) for t in _tokens(out)}) == 4, "seeded samples differ from each other"
    # samples 1..3 hit the two full blocks that sample 0 filled in the same step
    assert llm.scheduler.kv.num_hit_tokens - hits == 3 * 32
    alone = [llm.generate([PROMPT], SamplingParams(seed=7 + i, **SAMPLE), use_tqdm=False)[0].outputs[0].token_ids
             for i in range(4)]
    assert _tokens(out) == alone, "sample i is the request seeded seed + i"
    again, = llm.generate([PROMPT], SamplingParams(n=4, seed=7, **SAMPLE), use_tqdm=False)
    assert _tokens(again) == _tokens(out)


def test_unseeded_samples_differ_and_greedy_ones_agree(llm):
    outs = llm.generate([PROMPT, PROMPT[:9]], [SamplingParams(n=3, **SAMPLE),
                                               SamplingParams(n=2, temperature=0.0, max_tokens=5)], use_tqdm=False)
    assert len({tuple(t) for t in _tokens(outs[0])}) == 3
    assert len(outs[1].outputs) == 2 and outs[1].outputs[0].token_ids == outs[1].outputs[1].token_ids


def test_aborting_a_prompt_aborts_its_samples(llm):
    def abort_all(prompt, sample, text):
        llm.abort(list(llm._samples))  # the prompt's id (what RequestOutput.request_id will be)

    out, = llm.generate([PROMPT], SamplingParams(n=3, seed=1, temperature=1.0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False, on_text=abort_all)
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert all(len(c.token_ids) < 40 for c in out.outputs)


def test_on_text_streams_the_final_text_piece_by_piece(llm):
    pieces: dict[tuple[int, int], list[str]] = {}
    outs = llm.generate(["hello", "stream me"], SamplingParams(n=2, seed=3, temperature=1.0, max_tokens=12,
                                                                  ignore_eos=True),
                        use_tqdm=False, on_text=lambda p, s, t: pieces.setdefault((p, s), []).append(t))
    for p, out in enumerate(outs):
        for s, comp in enumerate(out.outputs):
            assert "".join(pieces[p, s]) == comp.text
    assert max(len(v) for v in pieces.values()) > 1


def test_max_tokens_none_runs_to_max_model_len_and_truncation_is_warned_once():
    llm = LLM(device="cpu", num_kv_blocks=64, max_model_len=48)
    out, = llm.generate([PROMPT[:10]], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)
    assert len(out.outputs[0].token_ids) == 38 and out.outputs[0].finish_reason == "length"
    with pytest.warns(UserWarning, match=r"prompt 1: max_tokens=100 is more than max_model_len=48 leaves after "
                                         r"its 20 prompt tokens: at most 28 tokens"):
        outs = llm.generate([PROMPT[:10], PROMPT[:20]], [SamplingParams(max_tokens=5),
                                                         SamplingParams(max_tokens=100, ignore_eos=True)],
                            use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 28] and outs[1].outputs[0].finish_reason == "length"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per engine
        llm.generate([PROMPT[:20]], SamplingParams(max_tokens=100, ignore_eos=True), use_tqdm=False)


def test_logprobs_are_dicts_holding_the_sampled_token(llm):
    out, = llm.generate(["tokens with logprobs"], SamplingParams(seed=5, logprobs=3, **SAMPLE), use_tqdm=False)
    comp = out.outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids) == 8
    total = 0.0
    for tok, lp in zip(comp.token_ids, comp.logprobs):
        assert isinstance(lp, TokenLogprobs) and isinstance(lp, dict) and tok in lp and 3 <= len(lp) <= 4
        assert all(isinstance(v, Logprob) for v in lp.values())
        assert [lp[t].rank for t in list(lp)[:3]] == [1, 2, 3]  # the top 3 first, in rank order
        values = [v.logprob for v in list(lp.values())[:3]]
        assert values == sorted(values, reverse=True) and lp[tok].logprob <= values[0]
        top = list(lp)[:3]
        assert lp[tok].rank == top.index(tok) + 1 if tok in top else lp[tok].rank > 3 and len(lp) == 4
        assert lp[tok].decoded_token == llm.tokenizer.decode([tok], skip_special_tokens=False)
        assert lp.token_ids[0] == tok and lp.logprobs[0] == lp[tok].logprob  # the earlier list view
        total += lp[tok].logprob
    assert math.isclose(comp.cumulative_logprob, total, rel_tol=1e-9)
    plain, = llm.generate(["tokens with logprobs"], SamplingParams(seed=5, **SAMPLE), use_tqdm=False)
    assert plain.outputs[0].logprobs is None and plain.outputs[0].cumulative_logprob is None
    assert plain.outputs[0].token_ids == comp.token_ids


def test_prompt_logprobs_match_hf_whole_sequence_logits(tmp_path_factory):
    model_dir = cached_hf_model("llama3", tmp_path_factory)
    prompt = list(range(3, 40))
    ref = torch.log_softmax(hf_logits(model_dir, prompt), dim=-1)
    for chunk in (8192, 16):  # whole prompt in one step, and chunked prefill
        llm = LLM(model=model_dir, device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128,
                  max_num_batched_tokens=chunk)
        llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)  # the prompt is now cached
        out, = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)
        assert out.num_cached_tokens == 0, "prompt logprobs need every position computed: no cache hits"
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for t in range(1, len(prompt)):
            row = ref[t - 1]
            assert abs(plp[t][prompt[t]].logprob - row[prompt[t]].item()) < 1e-4
            assert plp[t][prompt[t]].rank == int((row > row[prompt[t]]).sum()) + 1
            assert list(plp[t])[:2] == row.topk(2).indices.tolist()


def test_sampled_logprobs_equal_prompt_logprobs_of_the_continuation(llm):
    out, = llm.generate([PROMPT[:12]], SamplingParams(temperature=0.0, max_tokens=6, logprobs=2, ignore_eos=True),
                        use_tqdm=False)
    gen = out.outputs[0].token_ids
    again, = llm.generate([PROMPT[:12] + gen], SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)
    for k, (tok, lp) in enumerate(zip(gen, out.outputs[0].logprobs)):
        p = again.prompt_logprobs[12 + k]
        assert list(p) == list(lp) and abs(p[tok].logprob - lp[tok].logprob) < 1e-4
