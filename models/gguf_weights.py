"""A GGUF file's weights: dequantized by the ``gguf`` package, renamed to HF names, q/k un-permuted.

llama.cpp's converter permutes the rows of a Llama q/k projection so that the two halves of
each head's rotary pairs interleave (GGML's RoPE rotates adjacent pairs); our attention rotates
halves, as HF does, so the permutation is undone here. Qwen2/Qwen3 files are not permuted.
Each tensor is dequantized to float32 on the host (one tensor at a time) and copied into the
model through the same weight loaders as a safetensors checkpoint, which cast it to the
model's dtype and take this rank's shard under tensor parallelism.
"""
from __future__ import annotations

import re
from typing import Iterator

import numpy as np
import torch

from models.config import ModelConfig
from models.gguf import PERMUTED_QK, GGUFFile

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
          "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Not weights: llama3 rope divisors (read into the config by models/gguf.py).
_NOT_WEIGHTS = ("rope_freqs.weight",)


def hf_name(gguf_name: str) -> str:
    """The HF checkpoint name of a GGUF tensor; ValueError for a name this loader does not know."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _LAYER:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r} (not a Llama-family weight)")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"


def unpermute_qk(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute(w, n_head)`` of a q or k projection's rows (weight or bias):
    within each head, rows [0, 2, 4, ...] then [1, 3, 5, ...] go back to the first and second half."""
    rows = w.shape[0]
    if rows % (2 * num_heads):
        raise ValueError(f"cannot un-permute {rows} rows over {num_heads} heads")
    return w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize(f: GGUFFile, name: str) -> np.ndarray:
    """One tensor as float32 numpy in torch order (a copy; quantized types through the ``gguf`` package)."""
    from gguf import quants

    t = f.tensors[name]
    try:
        data = quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {name!r} of {f.path!r}: type {t.tensor_type.name} cannot be "
                         f"dequantized by the installed gguf package: {e}") from e
    return np.array(data, dtype=np.float32).reshape(f.tensor_shape(name))


def gguf_weights(f: GGUFFile, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 CPU tensor) for every weight of the file, one at a time."""
    permuted = f.architecture in PERMUTED_QK
    for name in f.tensors:
        if name in _NOT_WEIGHTS:
            continue
        w = dequantize(f, name)
        if permuted and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            w = unpermute_qk(w, heads)
        yield hf_name(name), torch.from_numpy(np.ascontiguousarray(w))


def hf_names(f: GGUFFile) -> list[str]:
    """The HF names of the file's weights (checked before anything is dequantized)."""
    return [hf_name(n) for n in f.tensors if n not in _NOT_WEIGHTS]
