"""Tiny GGUF files written with the ``gguf`` package's writer, as llama.cpp's converter would
(test helper): an HF checkpoint of tests/hf_models.py converted to GGUF names, Llama q/k rows
permuted, weights optionally quantized, plus a tokenizer (byte-level or sentencepiece BPE) and a
ChatML template in the metadata."""
from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
from safetensors.numpy import load_file

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_TEXT = ("the quick brown fox jumps over the lazy dog; then the other one ran into the forest and "
         "slept there until the morning, when it found the river and drank")
_ARCH = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
         "Qwen3ForCausalLM": "qwen3"}
_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
          "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if hf in top:
        return top[hf]
    parts = hf.split(".")  # model.layers.N.<module...>.weight|bias
    return f"blk.{parts[2]}.{_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter: interleave the two rotary halves of each head's rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_alphabet() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _byte_level_vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): 3 control tokens, 256 bytes, then merges learned from _TEXT."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + _byte_alphabet()
    words = [list(("Ġ" if i else "") + w) for i, w in enumerate(_TEXT.split(" "))]
    merges: list[str] = []
    while len(tokens) < size:
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            tokens.append(f"<|unused_{len(tokens)}|>")
            continue
        (a, b), _ = pairs.most_common(1)[0]
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if w[i] == a and w[i + 1] == b:
                    w[i:i + 2] = [a + b]
                i += 1
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    return tokens, types, merges


def _sentencepiece_vocab(size: int) -> tuple[list[str], list[int], list[float]]:
    """(tokens, types, scores): <unk> <s> </s>, 256 byte tokens, then pieces of _TEXT's words."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = Counter()
    for w in _TEXT.split(" "):
        w = "▁" + w
        for n in range(1, len(w) + 1):
            for i in range(len(w) - n + 1):
                pieces[w[i:i + n]] += 1
    chars = sorted({p for p in pieces if len(p) == 1})
    longer = [p for p, _ in sorted(pieces.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0])) if len(p) > 1]
    for p in chars + longer:
        if len(tokens) >= size:
            break
        tokens.append(p)
        types.append(1)
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, types, scores


def write_gguf(hf_dir: str, path: str, qtype: str = "F32", tokenizer: str = "gpt2",
               chat_template: str | None = CHATML) -> str:
    """Convert a tests/hf_models.py checkpoint to a GGUF file at ``path``; returns ``path``.
    ``qtype``: the type of 2-D weights (F32, F16, Q8_0, Q4_1...); norms and biases stay F32."""
    import gguf

    with open(os.path.join(hf_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    arch = _ARCH[cfg["architectures"][0]]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_file_type(0 if qtype == "F32" else 1 if qtype == "F16" else 7)
    vocab = cfg["vocab_size"]
    if tokenizer == "gpt2":
        tokens, types, merges = _byte_level_vocab(vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:
        tokens, types, scores = _sentencepiece_vocab(vocab)
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    tensors = load_file(os.path.join(hf_dir, "model.safetensors"))
    if rope.get("rope_type") == "llama3":
        from models.gguf import llama3_rope_divisors

        theta = float(rope.get("rope_theta", 10000.0))
        w.add_tensor("rope_freqs.weight", llama3_rope_divisors(
            head_dim, theta, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
            rope["original_max_position_embeddings"]).astype(np.float32))
    quant = gguf.GGMLQuantizationType[qtype]
    for hf, t in tensors.items():
        if hf == "lm_head.weight" and cfg.get("tie_word_embeddings"):
            continue
        t = t.astype(np.float32)
        if arch == "llama" and (".q_proj." in hf or ".k_proj." in hf):
            t = _permute(t, heads if ".q_proj." in hf else kv_heads)
        if t.ndim == 2 and qtype != "F32":
            w.add_tensor(_gguf_name(hf), gguf.quants.quantize(t, quant), raw_dtype=quant)
        else:
            w.add_tensor(_gguf_name(hf), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
