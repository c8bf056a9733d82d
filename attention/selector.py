"""Backend registry with lazy factories, and the choice for a device."""
from __future__ import annotations

import importlib
import os

import torch

from attention.backend import AttentionBackend

ENV_VAR = "RUNNERS_ATTENTION_BACKEND"

# name -> "module:Class"; modules import only when chosen (flash-attn and triton are optional).
_REGISTRY: dict[str, str] = {
    "torch": "attention.torch_ref:TorchAttentionBackend",
    "triton": "attention.triton_attn:TritonAttentionBackend",
    "flash": "attention.flash_attn:FlashAttentionBackend",
    "xla": "attention.xla_attn:XlaAttentionBackend",
    "auto": "attention.composite:AutoAttentionBackend",  # triton decode + flash prefill, per step
}


def register_backend(name: str, path: str) -> None:
    """Add a backend (also for out-of-tree packages): ``path`` is ``"module:Class"``."""
    _REGISTRY[name] = path


def available_backends() -> list[str]:
    return sorted(_REGISTRY)


def load_backend(name: str) -> type[AttentionBackend]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; known: {available_backends()}")
    module, _, cls = _REGISTRY[name].partition(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError as e:
        raise RuntimeError(f"attention backend {name!r} cannot be imported here: {e}") from e


def get_attn_backend(requested: str | None, device_type: str, dtype: torch.dtype, head_dim: int,
                     block_size: int, preference: tuple[str, ...] = ("torch",),
                     kv_cache_dtype: torch.dtype | None = None) -> type[AttentionBackend]:
    """An explicit choice (argument, else env RUNNERS_ATTENTION_BACKEND) must run here or
    fail with the reason; otherwise the first of the platform's ``preference`` that runs
    (with a KV cache of ``kv_cache_dtype``; None: the model's ``dtype``)."""
    requested = requested or os.environ.get(ENV_VAR) or None
    kv_dtype = kv_cache_dtype or dtype

    def why_not(cls: type[AttentionBackend]) -> str | None:
        return cls.unsupported_reason(device_type, dtype, head_dim, block_size) or \
            cls.kv_cache_dtype_reason(kv_dtype, dtype, device_type)

    if requested:
        cls = load_backend(requested)
        reason = why_not(cls)
        if reason:
            raise RuntimeError(f"attention backend {requested!r} cannot run here: {reason}")
        return cls
    reasons = []
    for name in preference:
        try:
            cls = load_backend(name)
        except (RuntimeError, ValueError) as e:
            reasons.append(str(e))
            continue
        reason = why_not(cls)
        if reason is None:
            return cls
        reasons.append(f"{name}: {reason}")
    raise RuntimeError(f"no attention backend runs on {device_type}: {reasons}")
