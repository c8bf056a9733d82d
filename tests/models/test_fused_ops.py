"""Fused Triton ops against the torch path they replace (the reference, itself checked against HF):
RMSNorm with/without residual (also per-head on strided q/k views), SiLU-and-mul, RoPE on strided
q/k with shuffled positions; float32 close, 16-bit bit-exact or within 1 ulp; the whole tiny
model with the fused path forced on vs off. CPU runs the kernels in Triton's interpreter;
the ``cuda`` variants run where a GPU is."""
import dataclasses
import os

import pytest
import torch

from models.fused_ops import (fused_add_rmsnorm, fused_ops_enabled, fused_ops_mode, get_fused_ops_mode, rotary,
                              silu_and_mul)
from models.layers import RMSNorm, SiluAndMul
from models.loader import load_model
from models.rotary import RotaryEmbedding, apply_rope, apply_rotary
from tests.models.paged import REF_BACKEND, BlockPool, build_metadata, kv_caches, positions_of

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("cpu runs the kernels only in Triton's interpreter (the cuda variant runs here)")
    return torch.device(request.param)


def _rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """16-bit floats as integers whose difference counts ulps (sign-magnitude -> two's order)."""
    i = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i >= 0, i, -32768 - i)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, exact: bool = False) -> None:
    """float32: within 1e-6; 16-bit: bit-exact (``exact``), else >= 99% exact, >= 99.9% within
    1 ulp, none past 2."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    out, ref = out.cpu(), ref.cpu()
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        return
    if exact:
        assert torch.equal(out, ref), f"{(out != ref).sum().item()} of {out.numel()} elements differ"
        return
    ulps = (_ordered(out) - _ordered(ref)).abs()
    # a rounding step left out or added shows as many 1-ulp differences, a last-bit fp32 change as few
    assert (ulps == 0).float().mean().item() >= 0.99, f"{(ulps > 0).sum().item()} of {ulps.numel()} differ"
    assert (ulps <= 1).float().mean().item() >= 0.999, f"{(ulps > 1).sum().item()} elements beyond 1 ulp"
    assert ulps.max().item() <= 2


def _both_paths(fn, *args):
    with fused_ops_mode("off"):
        ref = fn(*args)
    with fused_ops_mode("on"):
        out = fn(*args)
    return out, ref


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [96, 256])
def test_rmsnorm_matches_torch(device, dtype, with_residual, hidden):
    norm = RMSNorm(hidden, 1e-6).to(device)
    norm.weight.data = (1 + 0.2 * _rand(hidden, seed=1)).to(dtype).to(device)
    x = _rand(37, hidden, dtype=dtype, device=device, scale=3.0)
    residual = _rand(37, hidden, dtype=dtype, device=device, seed=2) if with_residual else None
    out, ref = _both_paths(norm, x, residual)
    if with_residual:
        assert_matches(out[1], ref[1], exact=True)  # the new residual: the same rounded add
        out, ref = out[0], ref[0]
    assert_matches(out, ref)


def test_rmsnorm_promotes_like_torch_with_float32_weight(device):
    norm = RMSNorm(64, 1e-5).to(device)
    norm.weight.data = (1 + 0.2 * _rand(64, seed=1)).to(device)
    x = _rand(5, 64, dtype=torch.bfloat16, device=device)
    out, ref = _both_paths(norm, x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_norm_on_strided_qk_views(device, dtype):
    """Qwen3's q/k norm: rows of head_dim in views of the packed qkv output."""
    t, hq, hk, d = 9, 6, 3, 32
    qkv = _rand(t, (hq + 2 * hk) * d, dtype=dtype, device=device, scale=2.0)
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    assert not q.is_contiguous()
    norm = RMSNorm(d, 1e-6).to(device)
    norm.weight.data = (1 + 0.2 * _rand(d, seed=3)).to(dtype).to(device)
    for x in (q, k):
        out, ref = _both_paths(norm, x)
        assert out.shape == (t, x.shape[1], d)
        assert_matches(out, ref)


def test_norm_of_more_leading_dims(device):
    x, w = _rand(2, 3, 5, 48, device=device), _rand(48, seed=1, device=device)
    norm = RMSNorm(48, 1e-6).to(device)
    norm.weight.data = w
    out, ref = _both_paths(norm, x)
    assert_matches(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(13, 2 * 160), (3, 2 * 1100), (2, 5, 2 * 24)])
def test_silu_and_mul_matches_torch(device, dtype, shape):
    x = _rand(*shape, dtype=dtype, device=device, scale=3.0)
    out, ref = _both_paths(SiluAndMul(), x)
    assert_matches(out, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 2, 32), (6, 3, 40), (8, 1, 16)])
@pytest.mark.parametrize("inplace", [False, True])
def test_rotary_on_strided_qk_matches_torch(device, dtype, heads, inplace):
    hq, hk, d = heads
    t, max_pos = 11, 300
    rope = RotaryEmbedding(d, max_pos, 10000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    rope = rope.to(device)
    positions = torch.randperm(max_pos, generator=torch.Generator().manual_seed(4))[:t].to(device)
    qkv = _rand(t, (hq + 2 * hk) * d, dtype=dtype, device=device, scale=2.0)
    v_before = qkv[:, (hq + hk) * d:].clone()
    q, k, _ = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k = q.view(t, hq, d), k.view(t, hk, d)
    cos, sin = rope.cos_sin(positions, dtype)
    q_ref, k_ref = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    qo, ko = rotary(q, k, positions, rope.cos_cache, rope.sin_cache, inplace=inplace)
    assert_matches(qo, q_ref, exact=True)
    assert_matches(ko, k_ref, exact=True)
    if inplace:  # written into the packed tensor; v untouched
        assert qo.data_ptr() == q.data_ptr() and ko.data_ptr() == k.data_ptr()
        assert torch.equal(qkv[:, :hq * d].view(t, hq, d), qo)
        assert torch.equal(qkv[:, (hq + hk) * d:], v_before)
    else:
        assert qo.is_contiguous() and ko.is_contiguous()


def test_step_inputs_choose_the_path(device):
    rope = RotaryEmbedding(16, 64, 10000.0).to(device)
    positions = torch.tensor([5, 0, 63, 7], device=device)
    q, k = _rand(4, 2, 16, device=device), _rand(4, 1, 16, device=device, seed=1)
    with fused_ops_mode("on"):
        fused = rope.step_inputs(positions, q)
        assert fused.cos is None and fused.sin is None
        out = apply_rope(q, k, fused)
    with fused_ops_mode("off"):
        ref_inputs = rope.step_inputs(positions, q)
        assert ref_inputs.cos is not None
        ref = apply_rope(q, k, ref_inputs)
    for o, r in zip(out, ref):
        assert_matches(o, r)


def test_mode_switch_and_errors(monkeypatch):
    start = get_fused_ops_mode()
    x = torch.zeros(2, 4)
    with fused_ops_mode("auto"):
        assert not fused_ops_enabled(x)  # cpu tensors take the torch path
    with fused_ops_mode("on"):
        assert not fused_ops_enabled(x.double())  # unsupported dtype: torch path
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            fused_ops_enabled(x)
    assert get_fused_ops_mode() == start
    with pytest.raises(ValueError, match="mode"):
        with fused_ops_mode("sometimes"):
            pass
    with pytest.raises(ValueError, match="weight"):
        fused_add_rmsnorm(x, torch.ones(3), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        fused_add_rmsnorm(x, torch.ones(4), 1e-6, torch.zeros(2, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="even"):
        silu_and_mul(torch.zeros(2, 5))
    q, cache = torch.zeros(3, 2, 8), torch.zeros(10, 4)
    with pytest.raises(ValueError, match="positions"):
        rotary(q, q, torch.zeros(2, dtype=torch.int64), cache, cache)
    with pytest.raises(ValueError, match="cos/sin"):
        rotary(q, q, torch.zeros(3, dtype=torch.int64), torch.zeros(10, 3), torch.zeros(10, 3))


def _on_device(md, device):
    moved = {f: getattr(md, f).to(device) for f in ("query_start_loc", "seq_lens", "block_table", "slot_mapping")}
    return dataclasses.replace(md, **moved)


@torch.no_grad()
@pytest.mark.parametrize("fam", ["llama3", "qwen3"])
def test_whole_model_fused_matches_torch_path(device, fam, hf_model_factory):
    """A prefill chunk after cached tokens plus decodes in one batch through the paged cache."""
    model = load_model(hf_model_factory(fam), torch.float32, device, REF_BACKEND)
    cfg = model.config
    computed, new = [0, 5, 9], [7, 6, 1]
    pool = BlockPool(num_blocks=16, block_size=4, seed=1)
    tables = [pool.reserve(r, c + n) for r, (c, n) in enumerate(zip(computed, new))]
    md = _on_device(build_metadata(computed, new, tables, 4), device)
    ids = torch.randint(0, cfg.vocab_size, (sum(new),), generator=torch.Generator().manual_seed(0)).to(device)
    positions = positions_of(computed, new).to(device)
    logits = {}
    for mode in ("off", "on"):
        caches = [(c * 0.01).to(device) for c in kv_caches(cfg.num_hidden_layers, 16, 4, cfg.num_key_value_heads,
                                                  cfg.head_dim)]
        with fused_ops_mode(mode):
            logits[mode] = model.compute_logits(model(ids, positions, caches, md)).cpu()
    torch.testing.assert_close(logits["on"], logits["off"], rtol=0, atol=1e-5)
