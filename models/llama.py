"""One decoder for the Llama family: Llama 2/3, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

Parameter names follow HF's except for the packed projections (``qkv_proj``,
``gate_up_proj``); ``LlamaForCausalLM.packed_modules`` maps them for the loader.
"""
from __future__ import annotations

import torch
from torch import nn

from attention.backend import AttentionBackend
from attention.metadata import AttentionMetadata
from distributed import TPGroup
from models.config import ModelConfig
from models.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm,
                           RowParallelLinear, SiluAndMul, VocabParallelEmbedding)
from models.mrope import MRotaryEmbedding
from models.rotary import RopeInputs, RotaryEmbedding, apply_rope


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: type[AttentionBackend], tp: TPGroup) -> None:
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, d, config.num_attention_heads,
                                          config.num_key_value_heads, config.attention_bias, tp)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size, self.kv_size, self.head_dim = self.qkv_proj.q_size, self.qkv_proj.kv_size, d
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size,
                                        config.o_proj_bias, tp)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.attn = attn_backend(self.num_heads, self.num_kv_heads, d, d ** -0.5)

    def forward(self, h: torch.Tensor, rope: RopeInputs, kv_cache: torch.Tensor | None,
                md: AttentionMetadata) -> torch.Tensor:
        t = h.shape[0]
        q, k, v = self.qkv_proj(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, k, rope)
        out = self.attn(q, k, v, kv_cache, md)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], config.mlp_bias, tp)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(inter, config.hidden_size, config.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: type[AttentionBackend], tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, attn_backend, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, rope: RopeInputs,
                kv_cache: torch.Tensor | None, md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, h = h, self.input_layernorm(h)
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(h, rope, kv_cache, md)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: type[AttentionBackend], tp: TPGroup) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, attn_backend, tp)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.mrope_section is not None:
            self.rotary_emb: RotaryEmbedding = MRotaryEmbedding(
                config.head_dim, config.max_position_embeddings, config.rope_theta, config.mrope_section,
                config.rope_scaling)
        else:
            self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings,
                                              config.rope_theta, config.rope_scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor | None], md: AttentionMetadata,
                mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if mm_embeds is not None:  # (token indices, their embeddings): encoder outputs replace placeholders
            h = h.index_copy(0, mm_embeds[0], mm_embeds[1].to(h.dtype))
        rope = self.rotary_emb.step_inputs(positions, h)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h, residual = layer(h, residual, rope, kv_cache, md)
        h, _ = self.norm(h, residual)
        return h


class LlamaForCausalLM(nn.Module):
    """The runner's model: ``forward`` gives hidden states, ``compute_logits`` the logits."""

    # packed parameter -> the HF tensors it holds, with their shard ids
    packed_modules: dict[str, tuple[tuple[str, object], ...]] = {
        "qkv_proj": (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")),
        "gate_up_proj": (("gate_proj", 0), ("up_proj", 1)),
    }

    def __init__(self, config: ModelConfig, attn_backend: type[AttentionBackend], tp: TPGroup | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp = tp = tp or TPGroup.single()
        self.model = LlamaModel(config, attn_backend, tp)
        if config.tie_word_embeddings:
            self.lm_head: VocabParallelEmbedding = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, tp)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor | None], md: AttentionMetadata,
                mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``input_ids`` ``[T]``, ``positions`` ``[T]`` (``[3, T]`` with M-RoPE) -> final hidden
        states ``[T, hidden]``; ``kv_caches`` has one entry per layer (None: no cache, every
        request starts at 0); ``mm_embeds``: (indices ``[K]``, ``[K, hidden]``) that replace
        those tokens' embeddings (image placeholders)."""
        if len(kv_caches) != self.config.num_hidden_layers:
            raise ValueError(f"kv_caches must have {self.config.num_hidden_layers} entries, got {len(kv_caches)}")
        return self.model(input_ids, positions, kv_caches, md, mm_embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[R, hidden] -> [R, vocab]`` in the model's dtype."""
        return self.lm_head.compute_logits(hidden)
