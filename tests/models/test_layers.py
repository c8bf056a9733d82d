"""Layers: tensor-parallel weight slicing (tp_size=2 on CPU), norms and RoPE against HF."""
import pytest
import torch

from distributed import TPGroup
from models.layers import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                           RMSNorm, RowParallelLinear, SiluAndMul, VocabParallelEmbedding)
from models.rotary import RotaryEmbedding, apply_rotary, rope_inv_freq

pytestmark = pytest.mark.cpu

G = torch.Generator().manual_seed(0)


def _rand(*shape):
    return torch.randn(*shape, generator=G)


def _ranks(cls, *args, tp_size=2, **kwargs):
    return [cls(*args, tp=TPGroup(r, tp_size), **kwargs) for r in range(tp_size)]


def test_column_parallel_shards_concatenate_to_full():
    w, b, x = _rand(12, 5), _rand(12), _rand(3, 5)
    ranks = _ranks(ColumnParallelLinear, 5, 12, bias=True)
    for layer in ranks:
        layer.weight_loader(layer.weight, w)
        layer.weight_loader(layer.bias, b)
        assert layer.weight.shape == (6, 5)
    assert torch.equal(torch.cat([r.weight for r in ranks]), w)
    assert torch.equal(torch.cat([r.bias for r in ranks]), b)
    torch.testing.assert_close(torch.cat([r(x) for r in ranks], -1), x @ w.T + b)


def test_merged_column_parallel_packs_each_part_per_rank():
    gate, up, x = _rand(8, 6), _rand(8, 6), _rand(4, 6)
    ranks = _ranks(MergedColumnParallelLinear, 6, [8, 8])
    for layer in ranks:
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up, 1)
    assert torch.equal(torch.cat([r.weight[:4] for r in ranks]), gate)
    assert torch.equal(torch.cat([r.weight[4:] for r in ranks]), up)
    act = SiluAndMul()
    full = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    torch.testing.assert_close(torch.cat([act(r(x)) for r in ranks], -1), full)
    with pytest.raises(ValueError, match="shard_id"):
        ranks[0].weight_loader(ranks[0].weight, up, 2)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_qkv_parallel_splits_heads(num_kv_heads):
    d, heads, hidden, tp = 3, 4, 5, 2
    q, k, v = _rand(heads * d, hidden), _rand(num_kv_heads * d, hidden), _rand(num_kv_heads * d, hidden)
    qb, kb, vb = _rand(heads * d), _rand(num_kv_heads * d), _rand(num_kv_heads * d)
    ranks = _ranks(QKVParallelLinear, hidden, d, heads, num_kv_heads, bias=True, tp_size=tp)
    for layer in ranks:
        for shard, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            layer.weight_loader(layer.weight, w, shard)
            layer.weight_loader(layer.bias, b, shard)
    qs, ks = ranks[0].q_size, ranks[0].kv_size
    assert qs == heads // tp * d and ks == max(num_kv_heads // tp, 1) * d
    assert torch.equal(torch.cat([r.weight[:qs] for r in ranks]), q)
    assert torch.equal(torch.cat([r.bias[:qs] for r in ranks]), qb)
    k_parts = [r.weight[qs:qs + ks] for r in ranks]
    v_parts = [r.bias[qs + ks:] for r in ranks]
    if num_kv_heads >= tp:
        assert torch.equal(torch.cat(k_parts), k) and torch.equal(torch.cat(v_parts), vb)
    else:  # one KV head, replicated on both ranks
        assert all(torch.equal(p, k) for p in k_parts) and all(torch.equal(p, vb) for p in v_parts)
    with pytest.raises(ValueError, match="expected shape"):
        ranks[0].weight_loader(ranks[0].weight, q[:, :4], "q")
    with pytest.raises(ValueError, match="shard_id"):
        ranks[0].weight_loader(ranks[0].weight, q, "o")


def test_qkv_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="num_attention_heads=3 is not divisible by tensor_parallel_size=2"):
        QKVParallelLinear(8, 2, 3, 1, tp=TPGroup(0, 2))
    with pytest.raises(ValueError, match="neither divides num_key_value_heads=3"):
        QKVParallelLinear(8, 2, 12, 3, tp=TPGroup(0, 4))
    with pytest.raises(ValueError, match="rank must be in"):
        TPGroup(2, 2)


def test_row_parallel_partial_sums_equal_full():
    w, b, x = _rand(5, 12), _rand(5), _rand(3, 12)
    ranks = _ranks(RowParallelLinear, 12, 5, bias=True)
    for layer in ranks:
        layer.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
    assert torch.equal(torch.cat([r.weight for r in ranks], 1), w)
    partial = sum(torch.nn.functional.linear(xs, r.weight) for xs, r in zip(x.chunk(2, -1), ranks))
    torch.testing.assert_close(partial + b, x @ w.T + b)
    with pytest.raises(ValueError, match=r"expected shape \(5, 12\), found \(5, 6\)"):
        ranks[0].weight_loader(ranks[0].weight, w[:, :6])


@pytest.mark.parametrize("cls", [VocabParallelEmbedding, ParallelLMHead])
def test_vocab_parallel_rows_with_padding(cls):
    w = _rand(7, 4)  # 7 rows over 2 ranks: 4 + 3, the last row of rank 1 is zero padding
    ranks = _ranks(cls, 7, 4)
    for layer in ranks:
        layer.weight.fill_(float("nan"))
        layer.weight_loader(layer.weight, w)
    assert torch.equal(ranks[0].weight, w[:4])
    assert torch.equal(ranks[1].weight[:3], w[4:]) and torch.equal(ranks[1].weight[3], torch.zeros(4))
    ids = torch.tensor([0, 6, 3, 4])
    # without all-reduce, each rank contributes the rows it owns and zeros elsewhere
    outside = [(ids < r.vocab_start) | (ids >= r.vocab_end) for r in ranks]
    local = [torch.nn.functional.embedding(torch.where(o, 0, ids - r.vocab_start), r.weight).masked_fill(o[:, None], 0)
             for o, r in zip(outside, ranks)]
    assert torch.equal(local[0] + local[1], w[ids])
    h = _rand(2, 4)
    logits = torch.cat([h @ r.weight.T for r in ranks], -1)[:, :7]
    torch.testing.assert_close(logits, h @ w.T)


def test_single_rank_layers_forward():
    w = _rand(7, 4)
    emb, head = VocabParallelEmbedding(7, 4), ParallelLMHead(7, 4)
    emb.weight_loader(emb.weight, w)
    head.weight_loader(head.weight, w)
    assert torch.equal(emb(torch.tensor([6, 0])), w[[6, 0]])
    h = _rand(3, 4)
    torch.testing.assert_close(head(h), h @ w.T)
    torch.testing.assert_close(emb.compute_logits(h), h @ w.T)


def test_rmsnorm_matches_hf_and_fused_residual():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in (torch.float32, torch.bfloat16):
        x, res, w = _rand(5, 16).to(dtype), _rand(5, 16).to(dtype), (1 + _rand(16)).to(dtype)
        ours, hf = RMSNorm(16, 1e-5).to(dtype), LlamaRMSNorm(16, eps=1e-5).to(dtype)
        with torch.no_grad():
            ours.weight.copy_(w)
            hf.weight.copy_(w)
            assert torch.equal(ours(x), hf(x))
            normed, new_res = ours(x, res)
            assert torch.equal(new_res, res + x) and torch.equal(normed, hf(res + x))


@pytest.mark.parametrize("rope_parameters", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
])
def test_rope_matches_hf_exactly(rope_parameters):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=1024,
                         rope_parameters=dict(rope_parameters))
    hf_rope = LlamaRotaryEmbedding(hf_cfg)
    scaling = None if rope_parameters["rope_type"] == "default" else {
        k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    assert torch.equal(rope_inv_freq(64, rope_parameters["rope_theta"], scaling), hf_rope.inv_freq)
    ours = RotaryEmbedding(64, 1024, rope_parameters["rope_theta"], scaling)
    positions = torch.tensor([0, 1, 5, 63, 64, 200, 1023])
    for dtype in (torch.float32, torch.bfloat16):
        q, k = _rand(7, 4, 64).to(dtype), _rand(7, 2, 64).to(dtype)
        cos, sin = ours.cos_sin(positions, dtype)
        hf_cos, hf_sin = hf_rope(q, positions[None])
        hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
        assert torch.equal(apply_rotary(q, cos, sin), hq[0].transpose(0, 1))
        assert torch.equal(apply_rotary(k, cos, sin), hk[0].transpose(0, 1))


def test_parameters_are_uninitialised_empties_in_the_ambient_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        layer = QKVParallelLinear(8, 2, 4, 2, bias=True)
    finally:
        torch.set_default_dtype(old)
    assert layer.weight.dtype == torch.float16 and not layer.weight.requires_grad
    assert layer.weight.shard_ids == ("q", "k", "v")
