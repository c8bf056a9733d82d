"""ModelConfig: both HF config formats, every family, and its errors."""
import json
import os
import subprocess
import sys

import pytest

from models.config import SUPPORTED_ARCHITECTURES, ModelConfig

pytestmark = pytest.mark.cpu

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 100, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256}
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _write(tmp_path, config, generation=None):
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_families_written_by_transformers(hf_model_dir, family):
    import transformers

    cfg = ModelConfig.from_dir(hf_model_dir)
    hf = transformers.AutoConfig.from_pretrained(hf_model_dir)
    assert cfg.architecture == hf.architectures[0]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        hf.vocab_size, hf.hidden_size, hf.intermediate_size)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads)
    assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.rope_type == hf.rope_parameters["rope_type"]
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.max_position_embeddings == hf.max_position_embeddings
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.dtype == "float32"
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    assert cfg.qk_norm == (family == "qwen3")
    assert cfg.attention_bias == (family in ("qwen2", "llama_tied"))
    assert cfg.o_proj_bias == cfg.mlp_bias == (family == "llama_tied")
    assert cfg.sliding_window == (4096 if family == "mistral" else None)


def test_old_and_new_rope_formats_agree(tmp_path):
    old = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    older = ModelConfig.from_dict({**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}})
    new = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                                             **LLAMA3}})
    assert old == older == new
    assert new.rope_theta == 500000.0 and new.rope_scaling == {"rope_type": "llama3", **LLAMA3}
    plain = ModelConfig.from_dict({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e6 and plain.rope_type == "default"
    assert ModelConfig.from_dict(BASE).rope_theta == 10000.0
    linear = ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_llama3_original_max_defaults_to_max_positions():
    params = {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}
    cfg = ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "llama3", **params}})
    assert cfg.rope_scaling["original_max_position_embeddings"] == 256


def test_head_dim_dtype_and_bias_rules():
    assert ModelConfig.from_dict(BASE).head_dim == 16
    assert ModelConfig.from_dict({**BASE, "head_dim": 40}).head_dim == 40
    assert ModelConfig.from_dict({**BASE, "torch_dtype": "bfloat16"}).dtype == "bfloat16"
    assert ModelConfig.from_dict({**BASE, "dtype": "float16", "torch_dtype": "bfloat16"}).dtype == "float16"
    assert ModelConfig.from_dict({**BASE, "num_key_value_heads": None}).num_key_value_heads == 4
    qwen2 = ModelConfig.from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.attention_bias and not qwen2.o_proj_bias  # Qwen2: q/k/v bias always, o_proj never
    llama = ModelConfig.from_dict({**BASE, "attention_bias": True})
    assert llama.attention_bias and llama.o_proj_bias
    mistral = ModelConfig.from_dict({**BASE, "architectures": ["MistralForCausalLM"], "attention_bias": True})
    assert not mistral.o_proj_bias


def test_eos_ids_from_config_and_generation_config(tmp_path):
    cfg = ModelConfig.from_dir(_write(tmp_path, {**BASE, "eos_token_id": 5}, {"eos_token_id": [7, 5, 9]}))
    assert cfg.eos_token_ids == (5, 7, 9)
    cfg = ModelConfig.from_dict({**BASE, "eos_token_id": [3, 4], "bos_token_id": None}, {"bos_token_id": 0})
    assert cfg.eos_token_ids == (3, 4) and cfg.bos_token_id == 0
    assert ModelConfig.from_dict(BASE).eos_token_ids == ()


def test_sliding_window():
    assert ModelConfig.from_dict({**BASE, "architectures": ["MistralForCausalLM"],
                                  "sliding_window": 128}).sliding_window == 128
    qwen = {**BASE, "architectures": ["Qwen3ForCausalLM"], "sliding_window": 4096}
    assert ModelConfig.from_dict({**qwen, "use_sliding_window": False}).sliding_window is None
    assert ModelConfig.from_dict({**qwen, "use_sliding_window": True}).sliding_window == 4096
    assert ModelConfig.from_dict({**BASE, "sliding_window": 16}).sliding_window is None


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)


def test_unsupported_architecture_lists_supported(tmp_path):
    _write(tmp_path, {**BASE, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="GPT2LMHeadModel") as e:
        ModelConfig.from_dir(tmp_path)
    assert all(a in str(e.value) for a in SUPPORTED_ARCHITECTURES)
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_dict({k: v for k, v in BASE.items() if k != "architectures"})


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0}, {"type": "dynamic", "factor": 2.0}])
def test_unsupported_rope_type_lists_supported(rope):
    with pytest.raises(ValueError, match=r"unsupported rope type .*default.*linear.*llama3"):
        ModelConfig.from_dict({**BASE, "rope_scaling": rope})


@pytest.mark.parametrize("bad, match", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"vocab_size": None}, "vocab_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"hidden_size": 66}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_invalid_fields_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**BASE, **bad})


def test_config_module_does_not_import_torch():
    code = "import sys, models.config; assert 'torch' not in sys.modules, 'torch was imported'"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_vision_language_configs_flat_and_nested(tmp_path, hf_model_factory):
    from runners.testing_multimodal import VL_CONFIG

    flat = ModelConfig.from_dict(VL_CONFIG)  # the original checkpoints' format: LM fields at the top
    assert flat.is_multimodal and flat.mrope_section == (2, 3, 3) and flat.rope_scaling is None
    assert flat.attention_bias and not flat.o_proj_bias and flat.image_token_id == 300
    assert flat.vision_config["embed_dim"] == 32
    nested = ModelConfig.from_dir(hf_model_factory("qwen2_5_vl"))  # transformers 5: a text_config
    assert nested.architecture == "Qwen2_5_VLForConditionalGeneration" and nested.mrope_section == (2, 3, 3)
    assert (nested.hidden_size, nested.num_hidden_layers, nested.rope_theta) == (64, 2, 1000000.0)
    assert not ModelConfig.from_dict(BASE).is_multimodal
    bad = {**VL_CONFIG, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 4]}}
    with pytest.raises(ValueError, match=r"mrope_section=\[2, 3, 4\] must be 3 sections adding up to head_dim/2=8"):
        ModelConfig.from_dict(bad)
    with pytest.raises(ValueError, match="has no vision_config"):
        ModelConfig.from_dict({k: v for k, v in VL_CONFIG.items() if k != "vision_config"})
