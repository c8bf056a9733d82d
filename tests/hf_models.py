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


_CACHE: dict[tuple[str, int], str] = {}


def cached_hf_model(family: str, tmp_path_factory: Any, seed: int = 0) -> str:
    """``make_hf_model`` once per (family, seed) per session, under pytest's tmp dir."""
    key = (family, seed)
    if key not in _CACHE:
        _CACHE[key] = make_hf_model(family, tmp_path_factory.mktemp(f"hf_{family}_{seed}"), seed=seed)
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
        from transformers import AutoModelForCausalLM

        _MODELS[model_dir] = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return _MODELS[model_dir]
