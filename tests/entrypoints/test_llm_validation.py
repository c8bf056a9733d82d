"""Bad input is refused before anything is queued, with errors that name the prompt's index,
the setting and the fix."""
from __future__ import annotations

import pytest

from engine import SamplingParams
from engine.config import EngineConfig
from runners.cpu import CPURunner
from tests.entrypoints.fake_executor import assert_whole, fake_llm

pytestmark = pytest.mark.cpu


@pytest.fixture
def llm():
    # 7 usable blocks of 16: a request may reach 112 tokens
    return fake_llm(device="cpu", block_size=16, num_kv_blocks=8, max_model_len=256)


def _nothing_queued(llm) -> None:
    assert_whole(llm)
    assert llm.executor.calls == 0


def test_a_never_fitting_request_in_a_batch_queues_nothing(llm):
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    with pytest.raises(ValueError, match=r"prompt 2: request 'req-2' may reach 216 tokens .* needing 14 KV blocks "
                                         r".*num_kv_blocks=8 \(7 usable\): raise num_kv_blocks"):
        llm.generate([[1] * 10, [2] * 20, [3] * 200, [4] * 5], params, use_tqdm=False)
    _nothing_queued(llm)
    outs = llm.generate([[1] * 10, [2] * 20], params, use_tqdm=False)  # the ones that fit still run
    assert [len(o.outputs[0].token_ids) for o in outs] == [16, 16]
    assert_whole(llm)


@pytest.mark.parametrize("prompts, error, message", [
    (["fine", [1, 2], b"bytes"], TypeError, "prompt 2: got bytes"),
    ([[1, 2], [True, 3]], TypeError, r"prompt 1: token ids must be integers \(not bool\)"),
    ([[1, 2], None], TypeError, "prompt 1: expected a str or a sequence"),
    (["a", [5, 400]], ValueError, r"prompt 1: token ids must be in \[0, 320\) \(the vocabulary\); got \[400\]"),
    (["a", []], ValueError, "prompt 1 is empty"),
    ([[1], [2] * 256], ValueError, "prompt 1 has 256 tokens; max_model_len=256 leaves no room"),
])
def test_bad_prompts_name_their_index_and_queue_nothing(llm, prompts, error, message):
    with pytest.raises(error, match=message):
        llm.generate(prompts, use_tqdm=False)
    _nothing_queued(llm)


def test_sampling_params_changed_after_construction_are_checked_again(llm):
    good, bad = SamplingParams(max_tokens=2), SamplingParams(max_tokens=2)
    bad.temperature = float("nan")
    with pytest.raises(ValueError, match="prompt 1: sampling_params: temperature must be a finite number >= 0, "
                                         "got nan"):
        llm.generate([[1], [2]], [good, bad], use_tqdm=False)
    bad.temperature, bad.max_tokens = 1.0, 0
    with pytest.raises(ValueError, match=r"prompt 0: sampling_params: max_tokens must be None \(until max_model_len\) "
                                         r"or an integer >= 1"):
        llm.generate([[1]], bad, use_tqdm=False)
    bad.max_tokens, bad.n = 2, 0  # checked before the prompt fans out into samples
    with pytest.raises(ValueError, match=r"prompt 0: sampling_params: n must be an integer >= 1"):
        llm.generate([[1]], bad, use_tqdm=False)
    _nothing_queued(llm)


def test_engine_seed_gets_our_message():
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\), got -1"):
        fake_llm(device="cpu", num_kv_blocks=8, max_model_len=64, seed=-1)


def test_max_model_len_beyond_the_checkpoint_is_refused():
    with pytest.raises(ValueError, match=r"max_model_len=4096 exceeds the model's max_position_embeddings=2048 "
                                         r"\(config.json\): lower max_model_len"):
        CPURunner(EngineConfig(device="cpu", max_model_len=4096, num_kv_blocks=8))
    CPURunner(EngineConfig(device="cpu", max_model_len=2048, num_kv_blocks=8))  # the limit itself is fine
