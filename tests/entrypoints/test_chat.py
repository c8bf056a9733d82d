"""LLM.chat: the checkpoint's chat template (from its directory) rendered as HF renders it,
tokenized without a second BOS, one conversation or several."""
import json
import shutil

import pytest

from engine import LLM, SamplingParams
from engine.chat_template import ChatTemplate
from models.default import CHAT_TEMPLATE, default_model_dir

pytestmark = pytest.mark.cpu

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi — ça va?"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(device="cpu", num_kv_blocks=64, max_model_len=256)


def test_template_renders_as_hf_transformers_does():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(default_model_dir())
    ours = ChatTemplate(CHAT_TEMPLATE, {"bos_token": "<bos>", "eos_token": "<eos>"})
    for conv, gen in ((CONV, True), (CONV + [{"role": "assistant", "content": "Oui."}], False)):
        assert ours.render(conv, add_generation_prompt=gen) == hf.apply_chat_template(
            conv, tokenize=False, add_generation_prompt=gen)


def test_chat_uses_the_directory_template_and_adds_no_second_bos(llm):
    out, = llm.chat(CONV, GREEDY, use_tqdm=False)
    text = "<bos><|system|>\nBe brief.<eos>\n<|user|>\nHi — ça va?<eos>\n<|assistant|>\n"
    assert out.prompt == text
    ids = llm.tokenizer.encode(text, add_special_tokens=False).ids
    assert out.prompt_token_ids == ids and ids.count(256) == 1  # <bos> once: the template's
    assert out.outputs[0].token_ids == llm.generate([ids], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_several_conversations_and_content_parts(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi —"}, {"type": "text", "text": "ça va?"}]}]
    outs = llm.chat([CONV, parts], GREEDY, use_tqdm=False)
    assert len(outs) == 2 and outs[1].prompt.endswith("<|user|>\nHi —\nça va?<eos>\n<|assistant|>\n")
    assert outs[0].outputs[0].token_ids == llm.chat(CONV, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(ValueError, match="only text content parts are supported"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], GREEDY)


def test_template_files_and_overrides(tmp_path):
    model = shutil.copytree(default_model_dir(), tmp_path / "m")
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    llm = LLM(model=str(model), device="cpu", num_kv_blocks=32, max_model_len=128)
    with pytest.raises(ValueError, match=r"has no chat template .*pass chat_template="):
        llm.chat(CONV, GREEDY)
    out, = llm.chat(CONV, GREEDY, chat_template="{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert out.prompt == "[Be brief.][Hi — ça va?]"
    (model / "chat_template.jinja").write_text("{{ messages[-1].content }}|{{ eos_token }}")
    llm2 = LLM(model=str(model), device="cpu", num_kv_blocks=32, max_model_len=128)
    assert llm2.chat(CONV, GREEDY)[0].prompt == "Hi — ça va?|<eos>"
    bad = "{% if messages[0].role != 'user' %}{{ raise_exception('must start with user') }}{% endif %}"
    with pytest.raises(ValueError, match="conversation 0: the chat template refused the conversation: must start"):
        llm2.chat(CONV, GREEDY, chat_template=bad)


def test_bad_conversations_are_named():
    t = ChatTemplate(CHAT_TEMPLATE)
    with pytest.raises(TypeError, match="expected a non-empty list of messages"):
        t.render("hello")
    with pytest.raises(TypeError, match="message 1: expected a dict with a 'role' string"):
        t.render([{"role": "user", "content": "a"}, {"content": "b"}])
    with pytest.raises(ValueError, match="the chat template does not compile"):
        ChatTemplate("{% for %}")
