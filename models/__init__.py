"""The Llama-family model on our attention layer, its HF safetensors loader and the tiny default.

Imports are lazy so that ``models.config`` stays torch-free for the engine.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "models.config",
    "SUPPORTED_ARCHITECTURES": "models.config",
    "LlamaForCausalLM": "models.llama",
    "load_model": "models.loader",
    "default_model_dir": "models.default",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
