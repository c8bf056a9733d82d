"""The composite (per-step) backend on the CPU: Triton (interpreter) as the decode kernel, the torch
reference as the prefill kernel; every route gives each single backend's output and writes the
KV cache once."""
import pytest
import torch

from attention.composite import StepPlan, composite_backend
from attention.crossovers import Crossover
from attention.selector import get_attn_backend
from attention.torch_ref import TorchAttentionBackend
from attention.triton_attn import TritonAttentionBackend
from platforms.cuda import CudaPlatform
from tests.attention.batch_utils import dense_reference, make_batch, rel_err

pytestmark = pytest.mark.skipif(
    TritonAttentionBackend.unsupported_reason("cpu", torch.float32, 64, 16) is not None,
    reason=str(TritonAttentionBackend.unsupported_reason("cpu", torch.float32, 64, 16)))

from tests.attention.composite_backends import TritonTorchComposite as Composite  # noqa: E402
SCALE = 0.125
# decodes and prefill chunks interleaved in batch order; prefills over cached prefixes
INTERLEAVED = ([1, 6, 1, 19, 1, 3, 1], [37, 0, 5, 26, 70, 12, 0])
# the usual order: cached decodes first, then a chunk continuation and new prompts
DECODES_FIRST = ([1, 1, 1, 9, 17], [40, 3, 64, 16, 0])
# contiguous decodes between prefill rows (one group a slice, the other gathered)
PREFILLS_AROUND = ([5, 1, 1, 7], [10, 20, 33, 0])


def _variant(**attrs):
    return type("Variant", (Composite,), attrs)


def _run(cls, b, cache=None):
    md = cls.prepare(b.md)
    cache = b.kv_cache.clone() if cache is None else cache
    return cls(8, 2, 64, SCALE)(b.q, b.k, b.v, cache, md), cache, md.extra


@pytest.mark.parametrize("layout", [INTERLEAVED, DECODES_FIRST, PREFILLS_AROUND])
@pytest.mark.parametrize("route", ["split", "decode", "prefill", None])
def test_every_route_equals_each_single_backend(layout, route) -> None:
    b = make_batch(*layout, pad_reqs=2, pad_tokens=3, seed=len(layout[0]))
    n = b.md.num_actual_tokens
    singles = {}
    for single in (TritonAttentionBackend, TorchAttentionBackend):
        cache = b.kv_cache.clone()
        singles[single.name] = (single(8, 2, 64, SCALE)(b.q, b.k, b.v, cache, b.md), cache)
    out, cache, plan = _run(_variant(route_override=route), b)
    assert plan.route == (route or "split")  # no table entry on the CPU: every row to its role
    for name, (ref, ref_cache) in singles.items():
        assert rel_err(out[:n], ref[:n]) < 1e-5, name
        # same cache contents, but for the null block (torch parks padding slots there)
        torch.testing.assert_close(cache[:, 1:], ref_cache[:, 1:], rtol=0, atol=0)
    assert rel_err(out[:n], dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, SCALE)[:n]) < 1e-5
    assert torch.count_nonzero(out[n:]) == 0


def test_groups_are_slices_when_contiguous_and_gathers_otherwise() -> None:
    plan = Composite.prepare(make_batch(*DECODES_FIRST, pad_reqs=1, pad_tokens=2).md).extra
    assert plan.decode.tokens == slice(0, 3) and plan.prefill.tokens == slice(3, 29)
    assert plan.decode.md.num_reqs == 3 and plan.decode.md.max_query_len == 1
    assert plan.prefill.md.query_start_loc.tolist() == [0, 9, 26]
    assert plan.prefill.md.seq_lens.tolist() == [25, 17]
    plan = Composite.prepare(make_batch(*INTERLEAVED).md).extra
    assert plan.decode.tokens.tolist() == [0, 7, 27, 31]
    assert plan.prefill.md.query_start_loc_cpu.tolist() == [0, 6, 25, 28]
    assert plan.prefill.md.block_table.shape[0] == 3
    plan = Composite.prepare(make_batch(*PREFILLS_AROUND).md).extra
    assert plan.decode.tokens == slice(5, 7) and plan.prefill.tokens.tolist() == [0, 1, 2, 3, 4, *range(7, 14)]


def test_kv_cache_written_once_per_token(monkeypatch) -> None:
    b = make_batch(*INTERLEAVED, pad_tokens=2, seed=4)
    for route in ("split", "decode", "prefill"):
        writes = []
        for cls in (TritonAttentionBackend, TorchAttentionBackend):
            orig = cls.write_kv
            monkeypatch.setattr(cls, "write_kv", lambda self, k, v, c, slots, orig=orig:
                                (writes.append(slots.clone()), orig(self, k, v, c, slots)))
        _run(_variant(route_override=route), b)
        monkeypatch.undo()
        assert len(writes) == 1, route
        slots = writes[0][writes[0] >= 0]
        assert slots.numel() == b.md.num_actual_tokens == slots.unique().numel()
        assert torch.equal(writes[0], b.md.slot_mapping)


def test_profiling_without_cache_splits_too() -> None:
    b = make_batch([1, 7, 1, 12], [0, 0, 0, 0], pad_reqs=1, pad_tokens=2, seed=5)
    md = _variant(route_override="split").prepare(b.md)
    out = Composite(8, 2, 64, SCALE)(b.q, b.k, b.v, None, md)
    assert md.extra.route == "split"
    assert rel_err(out, dense_reference(b.q, b.k, b.v, None, b.md, SCALE)) < 1e-5


def test_pure_decode_takes_the_decode_kernel_on_the_steps_own_tensors() -> None:
    """Graph-captured steps: whatever the table or a forced split, the decode route, no copies."""
    b = make_batch([1, 1, 1, 1], [3, 50, 17, 96], pad_reqs=3, pad_tokens=3, seed=7)
    for cls in (Composite, _variant(route_override="split"), _variant(crossover=Crossover(1 << 30, 1 << 30))):
        plan = cls.prepare(b.md).extra
        assert plan.route == "decode"
        assert plan.whole.query_start_loc is b.md.query_start_loc
        assert plan.whole.block_table is b.md.block_table
    assert Composite.supports_graphs is TritonAttentionBackend.supports_graphs is True
    assert composite_backend(TorchAttentionBackend, TritonAttentionBackend).supports_graphs is False


@pytest.mark.parametrize("q_lens,ctx,want", [
    ([1, 1, 40, 1], [9, 9, 0, 9], "split"),  # 40-token prefill row, 3 decodes
    ([1, 1, 4, 1], [9, 9, 0, 9], "decode"),  # short prefill rows stay on the decode kernel
    ([40, 30], [0, 5], "prefill"),
    ([1, 40], [9, 0], "prefill"),  # one decode: below split_min_decode_tokens
])
def test_prepare_routes_by_the_crossover(q_lens, ctx, want) -> None:
    cls = _variant(crossover=Crossover(prefill_min_query_len=32, split_min_decode_tokens=2))
    b = make_batch(q_lens, ctx, seed=1)
    out, _, plan = _run(cls, b)
    assert plan.route == want
    assert rel_err(out, dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, SCALE)) < 1e-5


def test_unprepared_metadata_is_prepared_on_the_fly() -> None:
    b = make_batch(*INTERLEAVED, seed=2)
    out = Composite(8, 2, 64, SCALE)(b.q, b.k, b.v, b.kv_cache.clone(), b.md)
    assert rel_err(out, dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, SCALE)) < 1e-5
    assert isinstance(Composite.prepare(b.md).extra, StepPlan) and b.md.extra is None


def test_selection() -> None:
    assert CudaPlatform.attention_backends[0] == "auto"  # the CUDA default when it runs
    with pytest.raises(RuntimeError, match="'auto' cannot run here"):
        get_attn_backend("auto", "cpu", torch.float32, 64, 16)
    picked = get_attn_backend(None, "cpu", torch.float32, 64, 16, ("auto", "triton", "torch"))
    assert picked is TritonAttentionBackend  # auto needs flash-attn: the next in line
    assert Composite.unsupported_reason("cpu", torch.float32, 64, 16) is None
    assert "decode backend 'triton'" in Composite.unsupported_reason("cpu", torch.float32, 96, 16)
