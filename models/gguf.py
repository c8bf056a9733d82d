"""GGUF files (llama.cpp's single-file format): the model's shape, read from the file's metadata.

``LLM(model="x.gguf")`` works for Llama-family files (GGUF architectures ``llama``, ``qwen2``,
``qwen3``). This module is torch-free (the ``gguf`` package reads the file through numpy): it
turns the metadata into the same HF-style config dict a ``config.json`` holds, so
``ModelConfig`` validates both alike. The tokenizer and chat template are in
``models/gguf_tokenizer.py``; the weights (dequantized, Llama's q/k permutation undone) in
``models/gguf_weights.py``. A file is parsed once per process (``open_gguf`` caches it by path,
size and modification time).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import numpy as np

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# llama.cpp's convert script permutes the q/k rows of these architectures (interleaved RoPE pairs).
PERMUTED_QK = ("llama",)


def is_gguf(path: object) -> bool:
    """True if ``path`` names a ``.gguf`` file (by its suffix; whether it exists is checked on open)."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".gguf")


class GGUFFile:
    """An open GGUF file: metadata values by key, tensors by name (numpy views of the mapped file)."""

    def __init__(self, path: str) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(path)
        except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct.error, ...
            size = os.path.getsize(path)
            raise ValueError(f"cannot read GGUF file {path!r} ({size:,} bytes): {e}. It is truncated, "
                             f"corrupt or not a GGUF file") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        self._values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        """A metadata value as a Python scalar, str or list (``default`` when absent)."""
        if key not in self._values:
            field = self.reader.get_field(key)
            self._values[key] = default if field is None else field.contents()
        value = self._values[key]
        return default if value is None else value

    @property
    def architecture(self) -> str:
        return str(self.get("general.architecture", ""))

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in torch order (GGUF lists dimensions innermost first)."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str | os.PathLike[str]) -> GGUFFile:
    """The parsed file (cached per process until the file changes). FileNotFoundError if absent."""
    path = os.path.realpath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file {path!r} does not exist")
    st = os.stat(path)
    return _open_cached(path, st.st_size, st.st_mtime_ns)


def hf_config(f: GGUFFile) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json-style dict, generation_config-style dict) from the file's metadata."""
    arch = f.architecture
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF file {f.path!r} has architecture {arch!r}; supported: {sorted(GGUF_ARCHITECTURES)}")
    if int(f.get("split.count", 1)) > 1:
        raise ValueError(f"GGUF file {f.path!r} is one part of a split model ({f.get('split.count')} files), "
                         f"which is not supported: merge the parts into one file (llama.cpp's gguf-split --merge)")
    if f.get(f"{arch}.expert_count", 0):
        raise ValueError(f"GGUF file {f.path!r} is a mixture-of-experts model, which is not supported")

    def need(key: str) -> int:
        value = f.get(f"{arch}.{key}")
        if value is None:
            raise ValueError(f"GGUF file {f.path!r} lacks metadata {arch}.{key}")
        return int(value)

    hidden, heads = need("embedding_length"), need("attention.head_count")
    head_dim = int(f.get(f"{arch}.attention.key_length", 0)) or (hidden // heads if hidden % heads == 0 else 0)
    if "token_embd.weight" not in f.tensors:
        raise ValueError(f"GGUF file {f.path!r} has no token_embd.weight tensor")
    rope_dims = f.get(f"{arch}.rope.dimension_count")
    if rope_dims is not None and head_dim and int(rope_dims) != head_dim:
        raise ValueError(f"GGUF file {f.path!r} rotates {rope_dims} of {head_dim} head dimensions (partial "
                         f"rotary), which is not supported")
    theta = _float32(f.get(f"{arch}.rope.freq_base", 10000.0))
    max_pos = int(f.get(f"{arch}.context_length", 2048))
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": f.tensor_shape("token_embd.weight")[0],
        "hidden_size": hidden,
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": int(f.get(f"{arch}.attention.head_count_kv", heads)),
        "max_position_embeddings": max_pos,
        "rms_norm_eps": _float32(f.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "tie_word_embeddings": "output.weight" not in f.tensors,
        "attention_bias": "blk.0.attn_q.bias" in f.tensors,
        "mlp_bias": "blk.0.ffn_up.bias" in f.tensors,
        "hidden_act": "silu",
    }
    if head_dim:
        config["head_dim"] = head_dim
    scaling = _rope_scaling(f, arch, head_dim, theta)
    if scaling is not None:
        config["rope_scaling"] = scaling
    dtype = {0: "float32", 1: "float16", 32: "bfloat16"}.get(f.get("general.file_type"))
    if dtype is not None:
        config["torch_dtype"] = dtype  # unquantized files; quantized ones run in the platform's default
    eos = [f.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    generation = {"bos_token_id": f.get("tokenizer.ggml.bos_token_id"),
                  "eos_token_id": [int(t) for t in dict.fromkeys(eos) if t is not None]}
    return config, generation


def _float32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _rope_scaling(f: GGUFFile, arch: str, head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = f.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in f.tensors:
        return _llama3_scaling(f, head_dim, theta)
    if kind in ("none", ""):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(f.get(f"{arch}.rope.scaling.factor", 1.0))}
    raise ValueError(f"GGUF file {f.path!r} uses rope scaling {kind!r}; supported: none, linear, llama3")


def llama3_rope_divisors(head_dim: int, theta: float, factor: float, low: float, high: float,
                         original: int) -> np.ndarray:
    """What llama.cpp's ``rope_freqs`` tensor holds for Llama 3 scaling: per frequency, the
    original inverse frequency over the scaled one."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    middle = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, middle))


def _llama3_scaling(f: GGUFFile, head_dim: int, theta: float) -> dict[str, Any] | None:
    """Llama 3 rope parameters that reproduce the file's rope_freqs divisors. The released
    checkpoints use low_freq_factor=1, high_freq_factor=4; with those fixed, the divisors give the
    factor (the largest) and the original context (from a dimension in the smooth band, else any
    value between the bands: every such choice gives the same frequencies)."""
    import gguf

    t = f.tensors["rope_freqs.weight"]
    divisors = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
    factor = float(divisors.max())
    if factor <= 1.0 + 1e-6:
        return None
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    high = divisors <= 1.0 + 1e-6
    low = divisors >= factor * (1 - 1e-6)
    middle = ~high & ~low
    if middle.any():
        smooth = (1 / divisors[middle] - 1 / factor) / (1 - 1 / factor)
        original = float(np.median(wavelen[middle] * (3 * smooth + 1)))
    else:
        lo_bound = 4 * wavelen[high].max() if high.any() else 0.0
        hi_bound = wavelen[low].min()
        original = 8192.0 if lo_bound < 8192 < hi_bound else (lo_bound + hi_bound) / 2
    original = int(original) if original == round(original) else float(original)
    if wavelen.shape == divisors.shape and np.allclose(
            llama3_rope_divisors(head_dim, theta, factor, 1.0, 4.0, original), divisors, rtol=1e-4):
        return {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": original}
    raise ValueError(f"GGUF file {f.path!r} has a rope_freqs tensor that no Llama 3 rope scaling with "
                     f"low_freq_factor=1, high_freq_factor=4 reproduces")
