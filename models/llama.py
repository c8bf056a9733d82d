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
from models.fused_ops import GemvRope
from models.layers import (MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear, RMSNorm,
                           RowParallelLinear, SiluAndMul, VocabParallelEmbedding, rmsnorm_and_project,
                           takes_norm_gemv)
from models.mrope import MRotaryEmbedding
from models.rotary import RopeInputs, RotaryEmbedding, apply_rope
from models.split import TokenwiseSplit


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

    def qkv(self, h: torch.Tensor, rope: RopeInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The token-wise part before attention: q ``[T, Hq, D]``, k and v ``[T, Hk, D]``."""
        return self.split_qkv(self.qkv_proj(h), rope)

    def gemv_rope(self, rope: RopeInputs) -> GemvRope | None:
        """The rotation for the qkv GEMV to apply itself (fused path, 1-D positions, no q/k norm
        between projection and RoPE), else None."""
        if self.qk_norm or rope.cos is not None or rope.positions.dim() != 1:
            return None
        return GemvRope(rope.positions, rope.cos_cache, rope.sin_cache, self.head_dim, self.q_size + self.kv_size)

    def split_qkv(self, qkv: torch.Tensor, rope: RopeInputs, rotated: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``qkv_proj``'s output ``[T, q + 2 kv]`` -> q, k, v heads (q/k normed, rotated unless
        ``rotated`` says the projection did it)."""
        t = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if not rotated:
            q, k = apply_rope(q, k, rope)
        return q, k, v

    def forward(self, h: torch.Tensor, rope: RopeInputs, kv_cache: torch.Tensor | None,
                md: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv(h, rope)
        return self.o_proj(self.attn(q, k, v, kv_cache, md).reshape(h.shape[0], -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TPGroup) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], config.mlp_bias, tp)
        self.act = SiluAndMul()
        self.down_proj = RowParallelLinear(inter, config.hidden_size, config.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``gate_up_proj``'s output -> SiLU-and-mul, then ``down_proj`` (one kernel where it fuses)."""
        return self.down_proj.forward_silu_mul(gate_up, self.act)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: type[AttentionBackend], tp: TPGroup) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, attn_backend, tp)
        self.mlp = LlamaMLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def before_attention(self, h: torch.Tensor, residual: torch.Tensor | None, rope: RopeInputs
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token-wise: (q, k, v, residual) for this layer's attention."""
        attn, norm = self.self_attn, self.input_layernorm
        fused_rope = attn.gemv_rope(rope) if takes_norm_gemv(norm, attn.qkv_proj, h, residual) else None
        qkv, residual = rmsnorm_and_project(norm, attn.qkv_proj, h, residual, fused_rope)
        return (*attn.split_qkv(qkv, rope, rotated=fused_rope is not None), residual)

    def after_attention(self, attn_out: torch.Tensor, residual: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token-wise: o_proj, residual add + norm, MLP -> (h, residual) for the next layer."""
        h = self.self_attn.o_proj(attn_out.reshape(attn_out.shape[0], -1))
        gate_up, residual = rmsnorm_and_project(self.post_attention_layernorm, self.mlp.gate_up_proj, h, residual)
        return self.mlp.down(gate_up), residual

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, rope: RopeInputs,
                kv_cache: torch.Tensor | None, md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, residual = self.before_attention(h, residual, rope)
        return self.after_attention(self.self_attn.attn(q, k, v, kv_cache, md), residual)


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

    def tokenwise_split(self) -> TokenwiseSplit:
        """The forward as token-wise pieces split at attention (piecewise graphs)."""
        m = self.model
        layers = list(m.layers)
        return TokenwiseSplit(
            entry=_Entry(m.embed_tokens, m.rotary_emb, layers[0]),
            between=[_Between(a, b, m.rotary_emb) for a, b in zip(layers, layers[1:])],
            exit=_Exit(layers[-1], m.norm),
            attention=[layer.self_attn.attn for layer in layers])


# Token-wise pieces: each holds references to the model's modules (no weights of its own).
class _Entry(nn.Module):
    """input_ids, positions -> (q, k, v, residual) of the first layer."""

    def __init__(self, embed: nn.Module, rotary: RotaryEmbedding, layer: LlamaDecoderLayer) -> None:
        super().__init__()
        self.embed, self.rotary, self.layer = embed, rotary, layer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.embed(input_ids)
        return self.layer.before_attention(h, None, self.rotary.step_inputs(positions, h))


class _Between(nn.Module):
    """attn_out, residual, positions -> layer i's rest, then (q, k, v, residual) of layer i+1."""

    def __init__(self, prev: LlamaDecoderLayer, nxt: LlamaDecoderLayer, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.prev, self.next, self.rotary = prev, nxt, rotary

    def forward(self, attn_out: torch.Tensor, residual: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h, residual = self.prev.after_attention(attn_out, residual)
        return self.next.before_attention(h, residual, self.rotary.step_inputs(positions, h))


class _Exit(nn.Module):
    """attn_out, residual -> the last layer's rest and the final norm: hidden states."""

    def __init__(self, layer: LlamaDecoderLayer, norm: RMSNorm) -> None:
        super().__init__()
        self.layer, self.norm = layer, norm

    def forward(self, attn_out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor]:
        h, residual = self.layer.after_attention(attn_out, residual)
        return (self.norm(h, residual)[0],)
