"""The batch-1 GEMV kernels (``models.fused_ops.gemv``, ``rmsnorm_gemv``, ``silu_mul_gemv``) against
float64 math, their input checks, and the decoder's dispatch to them: one 16-bit row on the fused
path takes them, anything else keeps cuBLAS, and a whole model decoding one token gives the
unfused path's logits. CPU runs the kernels in Triton's interpreter; ``cuda`` where a GPU is."""
import os

import pytest
import torch
import torch.nn.functional as F

import models.layers
import models.rotary
from models.fused_ops import (GemvConfig, GemvRope, fused_ops_mode, gemv, gemv_supported, rmsnorm_gemv, rotary,
                              silu_mul_gemv)
from models.layers import ColumnParallelLinear, RMSNorm, RowParallelLinear, SiluAndMul, rmsnorm_and_project
from models.loader import load_model
from tests.models.paged import REF_BACKEND, BlockPool, build_metadata, kv_caches, positions_of
from tests.models.test_fused_ops import _on_device

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
PROLOGUES = ["plain", "rmsnorm", "add_rmsnorm", "silu_mul"]
# (N, K, config): masked blocks (neither divides), then blocks that divide both (no masks)
SHAPES = [(40, 96, None), (48, 128, GemvConfig(8, 64, 1, 4)), (24, 160, GemvConfig(16, 32, 2, 4))]
# a result within this fraction of the largest output: the rounding of the output and of the
# prologue's 16-bit intermediates; a lost scale, term or K-block is far outside it
TOL = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("cpu runs the kernels only in Triton's interpreter (the cuda variant runs here)")
    return torch.device(request.param)


def _rand(*shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)


def _case(prologue: str, n: int, k: int, dtype, device):
    """(call, float64 reference, residual sum or None) for one prologue on random inputs."""
    w = _rand(n, k, dtype=dtype, device=device, seed=1, scale=k ** -0.5)
    b = _rand(n, dtype=dtype, device=device, seed=2)
    nw = (1 + 0.3 * _rand(k, dtype=torch.float32, device=device, seed=3)).to(dtype)
    x = _rand(1, 2 * k if prologue == "silu_mul" else k, dtype=dtype, device=device, seed=4, scale=2.0)
    res = _rand(1, k, dtype=dtype, device=device, seed=5)
    w64, b64 = w.double(), b.double()
    if prologue == "plain":
        return (lambda c: gemv(x, w, b, c)), F.linear(x.double(), w64, b64), None
    if prologue == "silu_mul":
        a = F.silu(x[:, :k].double()) * x[:, k:].double()
        return (lambda c: silu_mul_gemv(x, w, b, c)), F.linear(a, w64, b64), None
    s = (res + x) if prologue == "add_rmsnorm" else x  # the rounded sum both paths normalise
    a = nw.double() * s.double() * torch.rsqrt(s.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    r = res if prologue == "add_rmsnorm" else None
    return (lambda c: rmsnorm_gemv(x, nw, 1e-5, w, b, r, c)), F.linear(a, w64, b64), s


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("prologue", PROLOGUES)
@pytest.mark.parametrize("shape", SHAPES, ids=["masked", "even8", "even16"])
def test_gemv_matches_float64(device, dtype, prologue, shape):
    n, k, config = shape
    call, ref, residual_sum = _case(prologue, n, k, dtype, device)
    out = call(config)
    if residual_sum is not None:
        out, stream = out
        # the residual stream: x itself, or the same rounded add as the unfused ops (torch's)
        assert torch.equal(stream.cpu(), residual_sum.cpu())
    assert out.shape == (1, n) and out.dtype == dtype
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * ref.abs().max().item(), f"max error {err} vs max |y| {ref.abs().max().item()}"


@torch.no_grad()
@pytest.mark.parametrize("head_dim,hq,hk,bias,residual,config", [
    (16, 4, 2, True, True, None),                       # qwen2-like: bias, 8-row programs
    (8, 2, 1, False, False, GemvConfig(16, 32, 1, 4)),  # 16 rows asked, 8 fit a head (halved)
    (32, 2, 2, False, True, GemvConfig(4, 64, 1, 4)),   # 2 pairs a program
    (2, 3, 1, True, True, None)])                       # one pair a head
def test_rope_epilogue_equals_gemv_then_rotary(device, head_dim, hq, hk, bias, residual, config):
    """The qkv GEMV with its RoPE epilogue gives, bit for bit, the GEMV's output rotated by the
    rotary kernel (q and k heads; v untouched), for any position and a cos/sin table with a row
    stride of its own."""
    n, k, dt = (hq + 2 * hk) * head_dim, 64, torch.bfloat16
    x, res = _rand(1, k, dtype=dt, device=device, seed=4), _rand(1, k, dtype=dt, device=device, seed=5)
    nw = (1 + 0.3 * _rand(k, dtype=torch.float32, device=device, seed=3)).to(dt)
    w = _rand(n, k, dtype=dt, device=device, seed=1, scale=k ** -0.5)
    b = _rand(n, dtype=dt, device=device, seed=2) if bias else None
    r = res if residual else None
    angles = torch.arange(40.0)[:, None] * torch.rand(head_dim // 2, generator=torch.Generator().manual_seed(6))
    table = torch.cat([angles.cos(), angles.sin()], dim=1).to(device)  # cos | sin in one row
    cos, sin = table[:, :head_dim // 2], table[:, head_dim // 2:]
    for p in (0, 7, 39):
        pos = torch.tensor([p], device=device)
        y, stream = rmsnorm_gemv(x, nw, 1e-5, w, b, r, config)
        q, kk, v = y.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
        qo, ko = rotary(q.view(1, hq, head_dim), kk.view(1, hk, head_dim), pos, cos.contiguous(), sin.contiguous())
        ref = torch.cat([qo.reshape(1, -1), ko.reshape(1, -1), v], dim=-1)
        y_rope, stream_rope = rmsnorm_gemv(x, nw, 1e-5, w, b, r, config,
                                           GemvRope(pos, cos, sin, head_dim, (hq + hk) * head_dim))
        assert torch.equal(y_rope, ref), f"position {p}: max diff {(y_rope.float() - ref.float()).abs().max()}"
        assert torch.equal(stream_rope, stream)


def test_rope_epilogue_input_checks():
    x, w = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(48, 64, dtype=torch.bfloat16)
    nw, cos = torch.ones(64, dtype=torch.bfloat16), torch.zeros(8, 4)
    pos = torch.zeros(1, dtype=torch.long)
    for rope, match in ((GemvRope(pos, cos, cos, 7, 16), "even head_dim"),        # odd head_dim
                        (GemvRope(pos, cos, cos, 8, 52), "rows=52"),              # rows past N
                        (GemvRope(pos, cos, cos, 8, 12), "rows=12"),              # not whole heads
                        (GemvRope(torch.zeros(2, dtype=torch.long), cos, cos, 8, 16), "one position"),
                        (GemvRope(pos, cos.double(), cos, 8, 16), "cos_cache"),
                        (GemvRope(pos, cos, torch.zeros(8, 3), 8, 16), "sin_cache")):
        with pytest.raises(ValueError, match=match):
            rmsnorm_gemv(x, nw, 1e-5, w, rope=rope)


def test_input_checks():
    x, w = torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(32, 64, dtype=torch.bfloat16)
    assert gemv_supported(x, w)
    assert not gemv_supported(torch.zeros(2, 64, dtype=torch.bfloat16), w)  # two rows: cuBLAS
    assert not gemv_supported(x.float(), w.float())  # float32: cuBLAS
    assert not gemv_supported(x, w.t().contiguous().t()[:, :64])  # strided weight rows
    with pytest.raises(ValueError, match="GEMV takes x"):
        gemv(torch.zeros(2, 64, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="GEMV takes x"):
        gemv(x, torch.zeros(32, 48, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="bias"):
        gemv(x, w, torch.zeros(31, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="norm weight"):
        rmsnorm_gemv(x, torch.ones(64), 1e-5, w)  # float32 norm weight with bf16 x
    with pytest.raises(ValueError, match="residual"):
        rmsnorm_gemv(x, torch.ones(64, dtype=torch.bfloat16), 1e-5, w, residual=torch.zeros(1, 64))
    with pytest.raises(ValueError, match="2I"):
        silu_mul_gemv(torch.zeros(1, 63, dtype=torch.bfloat16), w)


def _count_calls(monkeypatch, rotary_too: bool = False) -> dict[str, int]:
    calls = {"gemv": 0, "rmsnorm_gemv": 0, "silu_mul_gemv": 0}
    modules = {name: models.layers for name in calls}
    if rotary_too:
        calls["rotary"] = 0
        modules["rotary"] = models.rotary
    for name, module in modules.items():
        real = getattr(module, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return calls


@torch.no_grad()
@pytest.mark.parametrize("rows,dtype,mode,expect", [
    (1, torch.bfloat16, "on", True), (2, torch.bfloat16, "on", False),
    (1, torch.float32, "on", False), (1, torch.bfloat16, "off", False)])
def test_layers_take_gemv_only_for_one_16bit_row_on_the_fused_path(monkeypatch, rows, dtype, mode, expect):
    calls = _count_calls(monkeypatch)
    k, inter = 64, 96
    torch.manual_seed(0)
    norm, col = RMSNorm(k, 1e-5).to(dtype), ColumnParallelLinear(k, 2 * inter).to(dtype)
    down = RowParallelLinear(inter, k).to(dtype)
    for p in (norm.weight, col.weight, down.weight):
        p.data.normal_(0, 0.2)
    x, res = torch.randn(rows, k).to(dtype), torch.randn(rows, k).to(dtype)
    with fused_ops_mode(mode):
        gate_up, stream = rmsnorm_and_project(norm, col, x, res)
        y = down.forward_silu_mul(gate_up, SiluAndMul())
        z = col(y)
    with fused_ops_mode("off"):
        h, stream_ref = norm(x, res)
        gate_up_ref = col(h)
        y_ref = down(SiluAndMul()(gate_up_ref))
        z_ref = col(y_ref)
    assert calls == ({"gemv": 1, "rmsnorm_gemv": 1, "silu_mul_gemv": 1} if expect
                     else {"gemv": 0, "rmsnorm_gemv": 0, "silu_mul_gemv": 0})
    assert torch.equal(stream, stream_ref)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6
    for out, ref in ((gate_up, gate_up_ref), (y, y_ref), (z, z_ref)):
        assert (out.float() - ref.float()).abs().max().item() <= tol * ref.float().abs().max().item()


@torch.no_grad()
@pytest.mark.parametrize("fam", ["llama3", "qwen2", "qwen3"])
def test_whole_model_decoding_one_token_matches_unfused(device, fam, hf_model_factory, monkeypatch):
    """One decode row through the paged cache in bf16: every projection takes a GEMV kernel
    (qwen2: with the qkv bias), the qkv GEMV rotates q and k itself unless q/k norms sit
    between (qwen3: the rotary kernel runs), and the logits are the unfused path's within bf16
    rounding."""
    model = load_model(hf_model_factory(fam), torch.bfloat16, device, REF_BACKEND)
    cfg = model.config
    calls = _count_calls(monkeypatch, rotary_too=True)
    pool = BlockPool(num_blocks=8, block_size=4, seed=1)
    md = _on_device(build_metadata([6], [1], [pool.reserve(0, 7)], 4), device)
    ids = torch.tensor([3], device=device)
    positions = positions_of([6], [1]).to(device)
    logits = {}
    for mode in ("off", "on"):
        caches = [(c * 0.1).to(torch.bfloat16).to(device)
                  for c in kv_caches(cfg.num_hidden_layers, 8, 4, cfg.num_key_value_heads, cfg.head_dim)]
        with fused_ops_mode(mode):
            logits[mode] = model.compute_logits(model(ids, positions, caches, md)).float().cpu()
    n = cfg.num_hidden_layers
    # o_proj per layer + lm_head; the rotary kernel only where q/k norms come first
    assert calls == {"gemv": n + 1, "rmsnorm_gemv": 2 * n, "silu_mul_gemv": n, "rotary": n if cfg.qk_norm else 0}
    err = (logits["on"] - logits["off"]).abs().max().item()
    assert err <= 2 ** -5 * logits["off"].abs().max().item(), err
