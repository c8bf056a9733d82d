"""Cascade attention in the Triton backend: decode requests that share their leading pages attend
that prefix once per group of requests (``cascade_prefix_kernel``) and the rest per request, which
merges the prefix's partials itself (or, split too, through the reduce). The kernels read the
prefix length on the device (``md.shared_prefix``), so one launch plan - one captured graph -
serves every prefix. Against the float64 reference and the plain decode path (CPU: interpreter)."""
import dataclasses
import math

import numpy as np
import pytest
import torch

from attention.metadata import shared_prefix_len
from attention.triton_attn import TritonAttentionBackend
from attention.triton_tiles import decode_config, prefix_cascade_plan
from tests.attention.batch_utils import dense_reference, make_batch, rel_err

DEVICE = "cuda" if torch.accelerator.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    TritonAttentionBackend.unsupported_reason(DEVICE, torch.float32, 64, 16) is not None,
    reason=str(TritonAttentionBackend.unsupported_reason(DEVICE, torch.float32, 64, 16)))


def _shared_batch(ctx: list[int], shared_pages: int, block_size: int = 16, **kw):
    """Decode requests whose first ``shared_pages`` pages are request 0's (one prompt prefix)."""
    b = make_batch([1] * len(ctx), ctx, block_size=block_size, device=DEVICE, **kw)
    bt = b.md.block_table
    bt[:len(ctx), :shared_pages] = bt[0, :shared_pages].clone()
    n = b.md.num_reqs
    shared = shared_prefix_len(bt[:n].cpu().numpy(), b.md.seq_lens_cpu[:n], block_size)
    dev = torch.tensor([shared], dtype=torch.int32, device=bt.device)
    return dataclasses.replace(b, md=dataclasses.replace(b.md, shared_prefix_len=shared, shared_prefix=dev))


def _count_cascades(mp) -> list[int]:
    """Counts the launches that take the cascade (one entry per cascade launch)."""
    import attention.triton_attn as ta
    calls, real = [], ta.prefix_cascade_plan
    mp.setattr(ta, "prefix_cascade_plan", lambda *a: calls.append(1) or real(*a))
    return calls


def _backend(mp, heads, head_dim, min_tokens=32, min_reqs=2, splits=None):
    """A backend whose class takes cascades from ``min_tokens`` shared keys and ``min_reqs``
    requests (``prepare`` is a classmethod: the thresholds are the class's)."""
    mp.setattr(TritonAttentionBackend, "cascade_min_tokens", min_tokens)
    mp.setattr(TritonAttentionBackend, "cascade_min_reqs", min_reqs)
    be = TritonAttentionBackend(heads[0], heads[1], head_dim, 1 / math.sqrt(head_dim))
    be.num_splits_override = splits
    return be


@pytest.mark.cpu
@pytest.mark.parametrize("heads,head_dim", [((8, 2), 64), ((6, 2), 32)])
@pytest.mark.parametrize("splits", [None, 3])
def test_cascade_equals_reference_and_plain_decode(monkeypatch, heads, head_dim, splits):
    b = _shared_batch([100, 90, 200, 81, 150, 96], 5, num_heads=heads[0], num_kv_heads=heads[1],
                      head_dim=head_dim, pad_reqs=2, pad_tokens=2, seed=3)
    assert b.md.shared_prefix_len == 80  # 5 pages; every request has keys after them
    be = _backend(monkeypatch, heads, head_dim, splits=splits)
    md = be.prepare(b.md)
    assert md.cascade_prefix_len == 80
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 1 / math.sqrt(head_dim))
    cascades = _count_cascades(monkeypatch)
    out = be(b.q, b.k, b.v, b.kv_cache.clone(), md)
    assert cascades == [1]
    plain = be(b.q, b.k, b.v, b.kv_cache.clone(), dataclasses.replace(md, cascade_prefix_len=0))
    assert cascades == [1]
    n = b.md.num_actual_tokens
    assert rel_err(out[:n], ref[:n]) < 1e-5
    assert rel_err(out, plain) < 1e-6
    assert torch.count_nonzero(out[n:]) == 0  # padding rows stay zero


@pytest.mark.cpu
@pytest.mark.parametrize("sm_count", [4, 64])
def test_cascade_prefix_split_over_programs(monkeypatch, sm_count):
    """A long shared prefix split over one program (few SMs) or several slots (more SMs), each
    merged by the decode rows, which attend the per-request rest."""
    import attention.triton_attn as ta
    monkeypatch.setattr(ta, "_sm_count", lambda device: sm_count)
    b = _shared_batch([520, 530, 700], 32, seed=5)  # 512 shared keys
    be = _backend(monkeypatch, (8, 2), 64)
    md = be.prepare(b.md)
    _, splits = prefix_cascade_plan(decode_config(4, 64, torch.float32), 4, 3, 2, 64, 4, None, sm_count)
    assert splits == (2 if sm_count == 4 else 32)
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 0.125)
    assert rel_err(be(b.q, b.k, b.v, b.kv_cache, md), ref) < 1e-5


@pytest.mark.cpu
@pytest.mark.parametrize("splits", [None, 3])
def test_cascade_reads_the_prefix_length_on_the_device(monkeypatch, splits):
    """What makes a captured cascade graph right for every step: the launches depend only on
    shapes, and the kernels take the prefix from ``md.shared_prefix`` - whatever length it
    holds (0: nothing shared) gives the reference attention."""
    b = _shared_batch([100, 90, 200, 81], 5, seed=6, pad_reqs=1, pad_tokens=1)
    be = _backend(monkeypatch, (8, 2), 64, splits=splits)
    md = be.prepare(b.md)
    assert md.cascade_prefix_len == 80
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 0.125)
    n = b.md.num_actual_tokens
    for keys in (80, 64, 48, 0):  # any whole pages of the shared ones
        md.shared_prefix.fill_(keys)
        out = be(b.q, b.k, b.v, b.kv_cache, md)
        assert rel_err(out[:n], ref[:n]) < 1e-5, keys
        assert torch.count_nonzero(out[n:]) == 0


@pytest.mark.cpu
def test_cascade_without_the_device_length_is_an_error(monkeypatch):
    b = _shared_batch([100, 90, 200], 5, seed=1)
    be = _backend(monkeypatch, (8, 2), 64)
    md = dataclasses.replace(be.prepare(b.md), shared_prefix=None)
    with pytest.raises(ValueError, match="md.shared_prefix"):
        be(b.q, b.k, b.v, b.kv_cache, md)


@pytest.mark.cpu
def test_shared_prefix_detection():
    bt = np.array([[5, 6, 7, 8], [5, 6, 9, 10], [5, 6, 7, 11]], np.int32)
    assert shared_prefix_len(bt, np.array([60, 60, 60]), 16) == 32  # pages 0-1 shared by all
    assert shared_prefix_len(bt, np.array([60, 20, 60]), 16) == 16  # page 1 holds request 1's last key
    assert shared_prefix_len(bt, np.array([60, 17, 60]), 16) == 16  # key 16 is request 1's last: page 0 only
    assert shared_prefix_len(bt, np.array([60, 16, 60]), 16) == 0   # its last key sits in page 0
    assert shared_prefix_len(bt[:1], np.array([60]), 16) == 0       # one request: nothing to share
    assert shared_prefix_len(bt[[0, 1]] + np.array([[0], [1]], np.int32), np.array([60, 60]), 16) == 0


@pytest.mark.cpu
def test_cascade_only_past_the_thresholds(monkeypatch):
    b = _shared_batch([100, 90, 200], 5, seed=1)
    assert _backend(monkeypatch, (8, 2), 64, min_tokens=128).prepare(b.md).cascade_prefix_len == 0  # prefix too short
    assert _backend(monkeypatch, (8, 2), 64, min_reqs=4).prepare(b.md).cascade_prefix_len == 0  # too few requests
    assert _backend(monkeypatch, (8, 2), 64, min_tokens=0).prepare(b.md).cascade_prefix_len == 0  # switched off
    assert _backend(monkeypatch, (8, 2), 64).prepare(b.md).cascade_prefix_len == 80


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.bfloat16, None), (torch.float16, None),
                                               (torch.bfloat16, torch.float8_e4m3fn)])
def test_gpu_cascade_half_precision(monkeypatch, dtype, cache_dtype):
    """Compiled, at the Llama-3-8B head layout; with an fp8 cache the shared prefix's tiles are
    widened as they load (``widen_fp8_by_ptx``) like the per-request rows'."""
    ctx = [1100, 1030, 1500, 1090] * 8
    b = _shared_batch(ctx, 64, num_heads=32, num_kv_heads=8, head_dim=128, dtype=dtype, pad_reqs=3,
                      pad_tokens=3, seed=2)
    k, v, cache = b.k, b.v, b.kv_cache
    if cache_dtype is not None:  # new K/V fp8-representable, so the write loses nothing
        k, v, cache = k.to(cache_dtype).to(dtype), v.to(cache_dtype).to(dtype), cache.to(cache_dtype)
    be = _backend(monkeypatch, (32, 8), 128, min_tokens=256, min_reqs=8)
    md = be.prepare(b.md)
    assert md.cascade_prefix_len == 1024
    ref = dense_reference(b.q, k, v, cache, b.md, 128 ** -0.5)
    out = be(b.q, k, v, cache.clone(), md)
    assert rel_err(out, ref.to(out.device)) < 1e-2 and not torch.isnan(out).any()
    plain = be(b.q, k, v, cache.clone(), dataclasses.replace(md, cascade_prefix_len=0))
    assert rel_err(out, plain) < 3e-3


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.cpu), pytest.param("cuda", marks=pytest.mark.gpu)])
def test_engine_decodes_the_same_tokens_with_cascades(monkeypatch, device):
    """Prompts sharing a prefix, decoded together with the Triton kernels (CPU: the interpreter,
    eager; CUDA: cascade steps replay the cascade decode graphs): the decode steps take the
    cascade, and greedy tokens equal those without it."""
    from engine import LLM, SamplingParams
    if device != DEVICE:
        pytest.skip(f"needs {device}")

    prefix = "In a quiet village by the sea, the old lighthouse keeper kept a careful log of ships. " * 2
    prompts = [prefix + s for s in ("Today", "Yesterday the storm", "At dawn a", "Nobody knew why")]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    tokens = {}
    prepare = TritonAttentionBackend.prepare.__func__
    for min_tokens in (0, 32):
        monkeypatch.setattr(TritonAttentionBackend, "cascade_min_tokens", min_tokens)
        monkeypatch.setattr(TritonAttentionBackend, "cascade_min_reqs", 2)
        steps = []  # cascade steps (prepare's decision, whether the step replays a graph or not)
        monkeypatch.setattr(TritonAttentionBackend, "prepare", classmethod(
            lambda cls, md: (lambda out: steps.append(out.cascade_prefix_len) or out)(prepare(cls, md))))
        with LLM(device=device, dtype="float32", attention_backend="triton", max_model_len=256, block_size=16) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            graphs = llm.runner.graphs  # a cascade graph beside every decode graph of >= 2 requests
            want = [n for n in sorted(graphs.full) if n >= 2] if min_tokens else []
            assert sorted(graphs.cascade) == want
        tokens[min_tokens] = [o.outputs[0].token_ids for o in outs]
        assert any(steps) == (min_tokens > 0)
    assert tokens[32] == tokens[0]


@pytest.mark.cpu
def test_composite_passes_its_decode_backends_cascade_up(monkeypatch):
    """A pure-decode step routed to the Triton kernel carries Triton's cascade decision on the
    step's own metadata (what the graph manager reads) and computes the same attention."""
    from tests.attention.composite_backends import TritonTorchComposite

    b = _shared_batch([100, 90, 200, 81], 5, seed=4)
    be = _backend(monkeypatch, (8, 2), 64)
    md = TritonTorchComposite.prepare(b.md)
    assert md.extra.route == "decode" and md.cascade_prefix_len == 80
    cascades = _count_cascades(monkeypatch)
    out = TritonTorchComposite(8, 2, 64, 0.125)(b.q, b.k, b.v, b.kv_cache.clone(), md)
    assert cascades == [1]
    assert rel_err(out, be(b.q, b.k, b.v, b.kv_cache.clone(), TritonAttentionBackend.prepare(b.md))) < 1e-6
