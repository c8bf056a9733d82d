"""The embedded default model: deterministic bytes, safe first use, HF-loadable, byte tokenizer."""
import hashlib
import os
import threading
from pathlib import Path

import pytest
import torch

from models import default
from models.config import ModelConfig
from models.loader import load_model
from tests.models.paged import REF_BACKEND, positions_of, prefill_metadata

pytestmark = pytest.mark.cpu

TEXTS = ["Hello, world!", "naïve café — 日本語 🙂", "tabs\tand\nnewlines  ", ""]


def _digests(path):
    return {f: hashlib.sha256((path / f).read_bytes()).hexdigest() for f in sorted(os.listdir(path))}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return default.build_default_model(str(tmp_path_factory.mktemp("default")))


def test_build_is_deterministic(model_dir, tmp_path):
    again = default.build_default_model(str(tmp_path))
    first = _digests(Path(model_dir))
    assert first == _digests(Path(again))
    assert set(first) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json"}


def test_default_model_dir_builds_once_under_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNERS_CACHE_DIR", str(tmp_path))
    results, errors = [], []

    def first_use():
        try:
            results.append(default.default_model_dir())
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=first_use) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [str(tmp_path / default.NAME)] * 3
    assert sorted(os.listdir(tmp_path)) == [default.NAME]  # no temp dirs left behind
    stamp = os.stat(tmp_path / default.NAME / "model.safetensors").st_mtime_ns
    assert default.default_model_dir() == results[0]
    assert os.stat(tmp_path / default.NAME / "model.safetensors").st_mtime_ns == stamp


def test_cache_dir_falls_back_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("RUNNERS_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default.cache_dir() == str(tmp_path / ".cache" / "model-runners")


def test_config_is_the_suggested_tiny_llama(model_dir):
    cfg = ModelConfig.from_dir(model_dir)
    assert cfg.architecture == "LlamaForCausalLM" and cfg.rope_type == "llama3"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (256, 4, 8, 2)
    assert cfg.vocab_size % 64 == 0 and cfg.dtype == "float32"
    assert cfg.bos_token_id == default.BOS_ID and cfg.eos_token_ids == (default.EOS_ID,)


def test_tokenizer_round_trips_bytes_with_bos(model_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    for text in TEXTS:
        ids = tok.encode(text).ids
        assert ids == [default.BOS_ID, *text.encode("utf-8")]
        assert tok.decode(ids) == text
    assert tok.get_vocab_size() == default.VOCAB_SIZE


def test_hf_loads_it_and_agrees_with_our_model(model_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf_tok = AutoTokenizer.from_pretrained(model_dir)
    for text in TEXTS:
        ids = hf_tok(text).input_ids
        assert ids[0] == hf_tok.bos_token_id == default.BOS_ID
        assert hf_tok.decode(ids, skip_special_tokens=True) == text
    assert hf_tok.eos_token_id == default.EOS_ID
    hf = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    ours = load_model(model_dir, torch.float32, torch.device("cpu"), REF_BACKEND)
    ids = hf_tok(TEXTS[1]).input_ids
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0]
        got = ours.compute_logits(ours(torch.tensor(ids), positions_of([0], [len(ids)]), [None] * 4,
                                       prefill_metadata([len(ids)])))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_greedy_outputs_are_not_degenerate(model_dir):
    model = load_model(model_dir, torch.float32, torch.device("cpu"), REF_BACKEND)
    continuations = []
    for text in ("Hello", "The quick brown fox", "über"):
        ids = [default.BOS_ID, *text.encode()]
        for _ in range(10):
            hidden = model(torch.tensor(ids), torch.arange(len(ids)), [None] * 4, prefill_metadata([len(ids)]))
            ids.append(int(model.compute_logits(hidden[-1:]).argmax()))
        continuations.append(tuple(ids[-10:]))
        assert len(set(ids[-10:])) > 3, ids[-10:]
    assert len(set(continuations)) == len(continuations)
