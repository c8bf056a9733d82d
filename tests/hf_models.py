"""Tiny random HF checkpoints of every supported family, built with ``transformers`` (test helper).

``make_hf_model(family, path)`` writes one; ``cached_hf_model(family, tmp_path_factory)`` builds
each family once per test session (the fixtures in tests/models/conftest.py use it).
"""
from __future__ import annotations

import os
from typing import Any

import torch

FAMILIES = ("llama3", "llama_tied", "mistral", "qwen2", "qwen3")

# Wider than HF's 0.02 so logits spread out and greedy argmax has no near-ties.
_INIT_STD = 0.15
_COMMON: dict[str, Any] = dict(vocab_size=384, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               initializer_range=_INIT_STD, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                               tie_word_embeddings=False)


def _config(family: str, overrides: dict[str, Any]) -> Any:
    import transformers as tf

    if family == "llama3":
        cls, extra = tf.LlamaConfig, dict(rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif family == "llama_tied":
        cls, extra = tf.LlamaConfig, dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                                          num_key_value_heads=1)
    elif family == "mistral":
        cls, extra = tf.MistralConfig, dict(hidden_size=96, head_dim=32, sliding_window=4096)
    elif family == "qwen2":
        cls, extra = tf.Qwen2Config, dict(num_hidden_layers=3, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 1000000.0})
    elif family == "qwen3":
        cls, extra = tf.Qwen3Config, dict(head_dim=32, num_attention_heads=8, num_key_value_heads=4)
    else:
        raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")
    return cls(**{**_COMMON, **extra, **overrides})


def make_hf_model(family: str, path: str | os.PathLike[str], *, seed: int = 0, **config_overrides: Any) -> str:
    """Save a tiny random float32 ``family`` model (safetensors) to ``path`` and return the dir.

    Norm weights and biases are randomised too (HF initialises them to 1 and 0), so a
    mix-up in loading them cannot go unnoticed.
    """
    import transformers as tf

    config = _config(family, config_overrides)
    arch = {"llama3": tf.LlamaForCausalLM, "llama_tied": tf.LlamaForCausalLM, "mistral": tf.MistralForCausalLM,
            "qwen2": tf.Qwen2ForCausalLM, "qwen3": tf.Qwen3ForCausalLM}[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = arch(config).to(torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                elif name.endswith(".bias"):
                    p.normal_(0.0, _INIT_STD)
    path = os.fspath(path)
    model.save_pretrained(path, safe_serialization=True)
    return path


VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# Token ids of the tiny VL models (inside the 384-token vocabulary).
VL_TOKENS = dict(image_token_id=380, video_token_id=381, vision_start_token_id=378, vision_end_token_id=379)


def make_hf_vl_model(family: str, path: str | os.PathLike[str], *, seed: int = 0, **text_overrides: Any) -> str:
    """Save a tiny random float32 Qwen2-VL (``qwen2_vl``) or Qwen2.5-VL (``qwen2_5_vl``) model and its
    image processor config (images resized to 4..24 merged tokens). Qwen2.5's windows are 2x2
    merged tokens, block 0 windowed and block 1 full, so both attention kinds run on small images."""
    import transformers as tf
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text = {k: v for k, v in _COMMON.items() if k != "initializer_range"}
    text.update(max_position_embeddings=1024, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    text.update(text_overrides)  # e.g. fewer, wider heads (then rope_parameters with a matching mrope_section)
    if family == "qwen2_vl":
        cls, model_cls = tf.Qwen2VLConfig, tf.Qwen2VLForConditionalGeneration
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        cls, model_cls = tf.Qwen2_5_VLConfig, tf.Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                      window_size=56, fullatt_block_indexes=[1])
    else:
        raise ValueError(f"unknown VL family {family!r}; known: {VL_FAMILIES}")
    config = cls(text_config=text, vision_config=dict(vision, patch_size=14, spatial_merge_size=2,
                                                      temporal_patch_size=2, initializer_range=_INIT_STD),
                 initializer_range=_INIT_STD, **VL_TOKENS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config).to(torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                elif name.endswith(".bias"):
                    p.normal_(0.0, _INIT_STD)
                elif "visual" in name:
                    p.normal_(0.0, _INIT_STD)
    path = os.fspath(path)
    model.save_pretrained(path, safe_serialization=True)
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 24, patch_size=14, temporal_patch_size=2,
                             merge_size=2).save_pretrained(path)
    return path


_CACHE: dict[tuple[str, int], str] = {}


def cached_hf_model(family: str, tmp_path_factory: Any, seed: int = 0) -> str:
    """``make_hf_model`` once per (family, seed) per session, under pytest's tmp dir."""
    key = (family, seed)
    if key not in _CACHE:
        make = make_hf_vl_model if family in VL_FAMILIES else make_hf_model
        _CACHE[key] = make(family, tmp_path_factory.mktemp(f"hf_{family}_{seed}"), seed=seed)
    return _CACHE[key]


def hf_logits(model_dir: str, token_ids: list[int]) -> torch.Tensor:
    """Full-sequence float32 logits ``[len, vocab]`` of the HF model in ``model_dir`` (cached)."""
    key = (model_dir, tuple(token_ids))
    if key not in _LOGITS:
        model = _hf_model(model_dir)
        with torch.no_grad():
            _LOGITS[key] = model(torch.tensor([token_ids])).logits[0].float()
    return _LOGITS[key]


_LOGITS: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
_MODELS: dict[str, Any] = {}


def _hf_model(model_dir: str) -> Any:
    if model_dir not in _MODELS:
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

        vl = os.path.isfile(os.path.join(model_dir, "preprocessor_config.json"))
        auto = AutoModelForImageTextToText if vl else AutoModelForCausalLM
        _MODELS[model_dir] = auto.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return _MODELS[model_dir]
