"""GGUF loading: tiny files written as llama.cpp's converter writes them (q/k rows permuted,
weights quantized) load into the same model as the HF checkpoint they came from, and greedy
generation from a quantized file matches HF transformers loading the same file."""
import dataclasses
import os

import pytest
import torch

from engine import LLM, SamplingParams
from models.config import ModelConfig
from models.gguf_weights import unpermute_qk
from models.loader import load_model
from tests.gguf_models import _permute, write_gguf
from tests.hf_models import FAMILIES, cached_hf_model
from tests.models.paged import REF_BACKEND

pytestmark = pytest.mark.cpu

_SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
                 "max_position_embeddings", "tie_word_embeddings", "attention_bias", "o_proj_bias", "mlp_bias",
                 "qk_norm", "bos_token_id", "eos_token_ids")


@pytest.fixture(scope="module")
def gguf_factory(tmp_path_factory):
    cache = {}

    def get(family: str, qtype: str = "F32") -> tuple[str, str]:
        if (family, qtype) not in cache:
            hf_dir = cached_hf_model(family, tmp_path_factory)
            out = tmp_path_factory.mktemp(f"gguf_{family}_{qtype}")
            cache[family, qtype] = hf_dir, write_gguf(hf_dir, str(out / f"{family}.{qtype}.gguf"), qtype)
        return cache[family, qtype]
    return get


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.arange(8 * 6 * 3, dtype=torch.float32).reshape(48, 3).numpy()
    for heads in (1, 2, 3, 6):
        assert (unpermute_qk(_permute(w, heads), heads) == w).all()
        assert (unpermute_qk(_permute(w[:, 0], heads), heads) == w[:, 0]).all()  # biases too
    assert not (unpermute_qk(w, 2) == w).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_gguf_gives_the_hf_checkpoints_config_and_weights(family, gguf_factory):
    hf_dir, gguf = gguf_factory(family)
    ours, ref = ModelConfig.from_dir(gguf), ModelConfig.from_dir(hf_dir)
    for name in _SHAPE_FIELDS:
        if not (name == "architecture" and family == "mistral"):  # llama.cpp writes Mistral as "llama"
            assert getattr(ours, name) == getattr(ref, name), name
    if family == "llama3":  # rope scaling comes back from the rope_freqs tensor: same frequencies
        from models.rotary import rope_inv_freq

        assert ours.rope_type == "llama3"
        torch.testing.assert_close(rope_inv_freq(ours.head_dim, ours.rope_theta, ours.rope_scaling),
                                   rope_inv_freq(ref.head_dim, ref.rope_theta, ref.rope_scaling), rtol=1e-6, atol=0)
    a = load_model(gguf, torch.float32, "cpu", REF_BACKEND).state_dict()
    b = load_model(hf_dir, torch.float32, "cpu", REF_BACKEND).state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.mark.parametrize("family,qtype", [("mistral", "Q8_0"), ("mistral", "Q4_1"), ("qwen2", "Q4_1")])
def test_quantized_gguf_greedy_matches_hf_transformers(family, qtype, gguf_factory):
    """HF transformers reads the same file (``gguf_file=``), dequantizes it its own way and runs
    its own Llama; the token ids, so the tokenizer plays no part here."""
    from transformers import AutoModelForCausalLM

    _, gguf = gguf_factory(family, qtype)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (5, 19, 33)]
    llm = LLM(model=gguf, device="cpu", dtype="float32", num_kv_blocks=64, max_model_len=128)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                              dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    for p, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert out.outputs[0].token_ids == ref[0, len(p):].tolist()


def test_gguf_tokenizer_matches_hf_transformers(gguf_factory):
    from transformers import AutoTokenizer

    from entrypoints.model_files import load_tokenizer

    _, gguf = gguf_factory("llama_tied")
    ours = load_tokenizer(gguf)
    hf = AutoTokenizer.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf))
    for text in ("the quick brown fox", "<|im_start|>user\nthe lazy dog<|im_end|>\n", "héllo 12 wörld!\n\n x",
                 "  two spaces<|endoftext|>"):
        ids = ours.encode(text).ids
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text


def test_sentencepiece_gguf_tokenizer_matches_hf_transformers(tmp_path, tmp_path_factory):
    from transformers import AutoTokenizer

    from entrypoints.model_files import load_tokenizer

    path = write_gguf(cached_hf_model("llama3", tmp_path_factory), str(tmp_path / "spm.gguf"), tokenizer="llama")
    ours = load_tokenizer(path)
    hf = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in ("the quick brown fox", "then the other one ran", "Über 12 ünknown ✓ bytes", "a  b\n", "</s>x",
                 " lead"):
        ids = ours.encode(text).ids
        assert ids == hf(text)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text


def test_gguf_errors_name_the_problem(tmp_path, gguf_factory):
    with pytest.raises(FileNotFoundError, match="GGUF file .*absent.gguf.* does not exist"):
        ModelConfig.from_dir(tmp_path / "absent.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="cannot read GGUF file .*bad.gguf"):
        ModelConfig.from_dir(bad)
    _, gguf = gguf_factory("llama_tied")
    from models.gguf import hf_config, open_gguf

    f = open_gguf(gguf)
    f._values["general.architecture"] = "gpt2"
    try:
        with pytest.raises(ValueError, match="architecture 'gpt2'; supported"):
            hf_config(f)
        f._values.update({"general.architecture": "llama", "split.count": 3})
        with pytest.raises(ValueError, match=r"one part of a split model \(3 files\)"):
            hf_config(f)
    finally:
        f._values.pop("general.architecture")
        f._values.pop("split.count", None)
    assert dataclasses.asdict(ModelConfig.from_dir(gguf))["architecture"] == "LlamaForCausalLM"
