"""The Triton backend against the torch reference (CPU: Triton interpreter, small shapes)."""
import functools
import math

import pytest
import torch

from attention.prefix_gather import (GATHER_MIN_READS, NO_GATHER, PrefixGather, gather_pages,
                                     plan_prefix_gather)
from attention.triton_attn import TritonAttentionBackend, unified_attention, write_kv_cache_triton
from attention.triton_tiles import TileConfig, choose_num_splits, fit_shared_memory, prefill_config
from attention.torch_ref import write_kv_cache
from tests.attention.batch_utils import dense_reference, make_batch, rel_err, torch_reference_backend

DEVICE = "cuda" if torch.accelerator.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    TritonAttentionBackend.unsupported_reason(DEVICE, torch.float32, 64, 16) is not None,
    reason=str(TritonAttentionBackend.unsupported_reason(DEVICE, torch.float32, 64, 16)))


def _run(b, heads=(8, 2), head_dim=64, splits=None, min_split_tokens=16):
    be = TritonAttentionBackend(heads[0], heads[1], head_dim, 1 / math.sqrt(head_dim))
    be.num_splits_override, be.min_split_tokens = splits, min_split_tokens
    return be(b.q, b.k, b.v, b.kv_cache, b.md)


def _reference(b, heads=(8, 2), head_dim=64):
    cache = b.kv_cache.clone()
    ref = torch_reference_backend(heads[0], heads[1], head_dim, 1 / math.sqrt(head_dim))
    return ref(b.q, b.k, b.v, cache, b.md)


# decodes + prefill chunks over cached prefixes, padded requests and tokens
MIXED = ([1, 6, 1, 19, 3], [37, 0, 5, 26, 70])


@pytest.mark.cpu
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_mixed_batch_matches_reference(block_size: int, splits: int) -> None:
    b = make_batch(*MIXED, block_size=block_size, pad_reqs=2, pad_tokens=3, device=DEVICE,
                   seed=block_size + splits)
    ref = _reference(b)
    out = _run(b, splits=splits)
    assert rel_err(out[:b.md.num_actual_tokens], ref[:b.md.num_actual_tokens]) < 1e-5
    assert torch.count_nonzero(out[b.md.num_actual_tokens:]) == 0  # padding rows are zeros


@pytest.mark.cpu
@pytest.mark.parametrize("splits", [1, 4])
def test_pure_decode_with_padding(splits: int) -> None:
    b = make_batch([1, 1, 1, 1], [3, 50, 17, 96], pad_reqs=3, pad_tokens=3, device=DEVICE, seed=7)
    ref = _reference(b)
    out = _run(b, splits=splits)
    assert rel_err(out, ref) < 1e-5
    assert torch.count_nonzero(out[4:]) == 0


@pytest.mark.cpu
@pytest.mark.parametrize("heads,head_dim", [((4, 4), 128), ((6, 2), 32), ((8, 1), 64)])
def test_head_layouts(heads: tuple[int, int], head_dim: int) -> None:
    """MHA with head_dim 128, a non-power-of-two group (3), MQA."""
    b = make_batch([1, 9, 2], [20, 7, 0], num_heads=heads[0], num_kv_heads=heads[1],
                   head_dim=head_dim, device=DEVICE, seed=head_dim)
    ref = _reference(b, heads, head_dim)
    out = _run(b, heads, head_dim, splits=2)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.cpu
@pytest.mark.parametrize("splits", [1, 3])
def test_nan_in_unread_cache_slots_never_leaks(splits: int) -> None:
    """Slots no request may read (block tails, spare blocks, the null block) hold NaN."""
    b = make_batch([1, 5, 1], [30, 12, 0], block_size=16, pad_reqs=1, pad_tokens=2,
                   device=DEVICE, poison=float("nan"), seed=3)
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 1 / 8)
    out = _run(b, splits=splits)
    assert not torch.isnan(out).any()
    assert rel_err(out, ref) < 1e-5


@pytest.mark.cpu
def test_profiling_without_cache() -> None:
    b = make_batch([7, 1, 12], [0, 0, 0], pad_reqs=1, pad_tokens=2, device=DEVICE, seed=5)
    be = TritonAttentionBackend(8, 2, 64, 0.125)
    out = be(b.q, b.k, b.v, None, b.md)
    ref = dense_reference(b.q, b.k, b.v, None, b.md, 0.125)
    assert rel_err(out, ref) < 1e-5
    assert torch.count_nonzero(out[20:]) == 0


@pytest.mark.cpu
@pytest.mark.parametrize("new_kv", ["rows", "desc"])
@pytest.mark.parametrize("splits", [1, 3])
def test_prefill_reads_cached_prefix_and_new_rows(new_kv: str, splits: int) -> None:
    """Small prefill tiles (4 tokens x 4 heads, 16 keys) so a block crosses several cached
    tiles (whole and partial), whole and diagonal new-token tiles and split boundaries; the
    new K/V are strided column slices of a fused qkv output, as the model passes them."""
    b = make_batch([40, 1, 33, 2], [21, 50, 0, 16], block_size=16, pad_reqs=1, pad_tokens=3,
                   device=DEVICE, seed=11)
    qkv = torch.cat([b.q, b.k, b.v], dim=1)
    q, k, v = qkv[:, :8], qkv[:, 8:10], qkv[:, 10:12]
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 0.125)
    cache = b.kv_cache.clone()
    write_kv_cache_triton(k, v, cache, b.md.slot_mapping)
    tiles = (None, TileConfig(16, 4, 16, 4, 2))
    out = unified_attention(q, k, v, cache, b.md, 0.125, num_splits=splits, min_split_tokens=16,
                            configs=tiles, new_kv=new_kv)
    n = b.md.num_actual_tokens
    assert rel_err(out[:n], ref[:n]) < 1e-5
    assert torch.count_nonzero(out[n:]) == 0
    no_cache = unified_attention(q, k, v, None, b.md, 0.125, configs=tiles, new_kv=new_kv)
    assert rel_err(no_cache[:n], dense_reference(b.q, b.k, b.v, None, b.md, 0.125)[:n]) < 1e-5
    with pytest.raises(ValueError, match="new_kv"):
        unified_attention(q, k, v, cache, b.md, 0.125, new_kv="tma")
    with pytest.raises(ValueError, match="prefill_kernel"):
        unified_attention(q, k, v, cache, b.md, 0.125, prefill_kernel="cutlass")
    with pytest.raises(ValueError, match="cannot serve"):  # custom tiles; off sm90 too
        unified_attention(q, k, v, cache, b.md, 0.125, configs=tiles, prefill_kernel="gluon")


@pytest.mark.cpu
@pytest.mark.parametrize("new_kv", ["rows", "desc"])
@pytest.mark.parametrize("splits", [1, 3])
def test_gathered_prefix_equals_paged_and_reference(new_kv: str, splits: int) -> None:
    """Prefill rows over cached prefixes of whole and partial pages (one page shared with the
    new tokens), a row without a prefix, decode rows, padding, NaN in every slot no request may
    read: copying the prefixes into contiguous rows first gives the paged path's result."""
    b = make_batch([40, 1, 33, 2, 9], [21, 50, 32, 16, 0], block_size=8, pad_reqs=1, pad_tokens=3,
                   device=DEVICE, poison=float("nan"), seed=13)
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 0.125)
    cache = b.kv_cache.clone()
    write_kv_cache_triton(b.k, b.v, cache, b.md.slot_mapping)
    tiles = (None, TileConfig(16, 4, 16, 4, 2))
    plan = plan_prefix_gather(b.md, 8, 4, force=True)
    # request after request, the pages of each prefill row's prefix (q_len >= 2, cached > 0)
    want = [int(p) for r, c in ((0, 21), (2, 32), (3, 16)) for p in b.md.block_table[r, :-(-c // 8)]]
    assert plan.num_pages == len(want) and plan.page_ids.tolist() == want
    assert plan.first_page.tolist() == [0, 3, 3, 7, 9, 9]
    assert plan.page_rows.tolist() == [8, 8, 5, 8, 8, 8, 8, 8, 8] and plan.cached_pages == 9
    # the copy: each prefix's keys, then zeros (not the poison) to the end of its last page
    rows = gather_pages(cache, plan).view(2, 9, 8, *cache.shape[3:])
    live = torch.arange(8) < plan.page_rows.cpu()[:, None]
    torch.testing.assert_close(rows[:, live], cache[:, plan.page_ids][:, live], rtol=0, atol=0)
    assert torch.count_nonzero(rows[:, ~live]) == 0
    outs = {mode: unified_attention(b.q, b.k, b.v, cache, b.md, 0.125, num_splits=splits, min_split_tokens=16,
                                    configs=tiles, new_kv=new_kv, prefix_gather=mode) for mode in (True, False)}
    n = b.md.num_actual_tokens
    for out in outs.values():
        assert not torch.isnan(out).any()
        assert rel_err(out[:n], ref[:n]) < 1e-5
        assert torch.count_nonzero(out[n:]) == 0
    assert rel_err(outs[True][:n], outs[False][:n]) < 1e-6


@pytest.mark.cpu
def test_prefix_gather_heuristic_and_one_plan_per_step() -> None:
    """Gather when each cached page is read by enough query blocks and the copy is bounded;
    the backend builds the plan once per step (``md.extra``) and every layer reuses it."""
    long_rows = make_batch([64, 1], [40, 9], block_size=8, device=DEVICE, seed=1)
    short_rows = make_batch([8, 8], [40, 40], block_size=8, device=DEVICE, seed=2)
    no_prefix = make_batch([64, 1], [0, 9], block_size=8, device=DEVICE, seed=3)
    assert plan_prefix_gather(long_rows.md, 8, 4).num_pages == 5  # 16 query blocks read each page
    paged = plan_prefix_gather(short_rows.md, 8, 4)  # 2 < GATHER_MIN_READS: read page by page
    assert (paged.num_pages, paged.cached_pages) == (0, 10)
    assert plan_prefix_gather(short_rows.md, 8, 8 // GATHER_MIN_READS).num_pages == 10
    assert plan_prefix_gather(no_prefix.md, 8, 4, force=True) is NO_GATHER  # nothing cached
    assert NO_GATHER.cached_pages == 0
    never = plan_prefix_gather(long_rows.md, 8, 4, force=False)
    assert (never.num_pages, never.cached_pages) == (0, 5)
    huge = make_batch([64], [20000], block_size=256, device=DEVICE, seed=4)
    assert plan_prefix_gather(huge.md, 256, 4).num_pages == 0  # more than GATHER_MAX_TOKENS to copy
    be = TritonAttentionBackend(8, 2, 64, 0.125)
    cache = long_rows.kv_cache.clone()
    out = be(long_rows.q, long_rows.k, long_rows.v, cache, long_rows.md)
    plan = long_rows.md.extra
    assert isinstance(plan, PrefixGather) and plan.num_pages == 5
    again = be(long_rows.q, long_rows.k, long_rows.v, cache, long_rows.md)
    assert long_rows.md.extra is plan and torch.equal(out, again)
    assert rel_err(out, _reference(long_rows)) < 1e-5


@pytest.mark.cpu
def test_kv_write_matches_torch_and_skips_padding() -> None:
    b = make_batch([3, 1, 4], [5, 9, 0], block_size=16, pad_tokens=4, device=DEVICE, seed=11)
    ours, theirs = b.kv_cache.clone(), b.kv_cache.clone()
    write_kv_cache_triton(b.k, b.v, ours, b.md.slot_mapping)
    write_kv_cache(b.k, b.v, theirs, b.md.slot_mapping)
    torch.testing.assert_close(ours[:, b.written], theirs[:, b.written], rtol=0, atol=0)
    # everything else, the null block included (torch parks padding there), is untouched
    torch.testing.assert_close(ours[:, ~b.written], b.kv_cache[:, ~b.written], rtol=0, atol=0)


@pytest.mark.cpu
def test_kv_write_from_strided_views() -> None:
    """k/v as column slices of a fused qkv projection output."""
    b = make_batch([4], [2], device=DEVICE)
    qkv = torch.randn(4, 12, 64, device=DEVICE)
    k, v = qkv[:, 8:10], qkv[:, 10:12]
    cache = b.kv_cache.clone()
    write_kv_cache_triton(k, v, cache, b.md.slot_mapping)
    slots = b.md.slot_mapping
    flat = cache.view(2, -1, 2, 64)
    torch.testing.assert_close(flat[0, slots], k)
    torch.testing.assert_close(flat[1, slots], v)


@pytest.mark.cpu
def test_forced_split_equals_no_split_bitwise_close() -> None:
    b = make_batch([1, 1], [200, 130], device=DEVICE, seed=2)
    md, scale = b.md, 0.125
    one = unified_attention(b.q, b.k, b.v, b.kv_cache, md, scale, num_splits=1)
    many = unified_attention(b.q, b.k, b.v, b.kv_cache, md, scale, num_splits=5,
                             min_split_tokens=32)
    assert rel_err(many, one) < 1e-6


@pytest.mark.cpu
def test_split_heuristic_depends_on_shapes_only() -> None:
    assert choose_num_splits(8, 132) == 33  # 1 request x 8 KV heads: fill 2 programs per SM
    assert choose_num_splits(128, 132) == 3
    assert choose_num_splits(512, 132) == 1
    assert choose_num_splits(1, 1000) == 64  # capped
    cfg = prefill_config(4, 128, torch.bfloat16, 4096)
    assert (cfg.block_m, cfg.block_q) == (128, 32)
    assert prefill_config(4, 128, torch.bfloat16, 2).block_m == 16  # spec-decode sized tiles


@pytest.mark.cpu
def test_tiles_shrink_to_the_shared_memory_of_smaller_gpus() -> None:
    cfg = prefill_config(4, 128, torch.bfloat16, 8192)
    assert fit_shared_memory(cfg, 128, 2, 232448) == cfg  # H100: the tuned tiles
    a100 = fit_shared_memory(cfg, 128, 2, 166912)
    assert (a100.block_m, a100.block_n, a100.num_stages) == (128, 128, 2)
    small = fit_shared_memory(cfg, 128, 2, 101376)
    assert (small.block_m + 2 * small.num_stages * small.block_n) * 128 * 2 <= 101376
    assert small.block_m == small.block_q * 4  # rows stay tokens x group heads
    assert fit_shared_memory(cfg, 128, 2, None) == cfg  # interpreter: no limit


@pytest.mark.cpu
def test_unsupported_reasons() -> None:
    ok = TritonAttentionBackend.unsupported_reason
    assert ok("cuda", torch.bfloat16, 96, 16) is not None  # head_dim
    assert ok("cuda", torch.bfloat16, 128, 24) is not None  # block size
    assert ok("cuda", torch.int8, 128, 16) is not None
    assert ok("tpu", torch.bfloat16, 128, 16) is not None


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 64])
def test_gpu_half_precision(dtype: torch.dtype, block_size: int) -> None:
    b = make_batch([1, 300, 1, 77, 1], [900, 0, 4000, 513, 31], num_heads=32, num_kv_heads=8,
                   head_dim=128, block_size=block_size, pad_reqs=3, pad_tokens=5, device=DEVICE,
                   dtype=dtype, seed=block_size)
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 128 ** -0.5)
    for splits in (None, 1, 6):
        out = _run(b, (32, 8), 128, splits=splits, min_split_tokens=256)
        assert rel_err(out, ref.to(out.device)) < 1e-2
        assert not torch.isnan(out).any()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_size", [16, 64])
def test_gpu_gathered_prefix(block_size: int) -> None:
    """bf16, the Llama-3-8B head layout: prefill rows over long cached prefixes (their pages
    gathered, through TMA descriptors on Hopper) equal the paged path and the reference."""
    b = make_batch([1, 700, 1, 300, 64], [900, 2000, 4000, 513, 8192], num_heads=32, num_kv_heads=8,
                   head_dim=128, block_size=block_size, pad_reqs=2, pad_tokens=5, device=DEVICE,
                   dtype=torch.bfloat16, seed=block_size)
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 128 ** -0.5)
    cache = b.kv_cache.clone()
    write_kv_cache_triton(b.k, b.v, cache, b.md.slot_mapping)
    assert plan_prefix_gather(b.md, block_size, 32).num_pages > 0  # the heuristic takes this step
    outs = [unified_attention(b.q, b.k, b.v, cache, b.md, 128 ** -0.5, num_splits=s, prefix_gather=g)
            for g in (True, False) for s in (None, 4)]
    n = b.md.num_actual_tokens
    for out in outs:
        assert rel_err(out[:n], ref[:n].to(out.device)) < 3e-3
        assert torch.count_nonzero(out[n:]) == 0
    assert rel_err(outs[0][:n], outs[2][:n]) < 3e-3


@pytest.mark.cpu
def test_gluon_prefill_refusals() -> None:
    """Where the Hopper prefill kernel serves: sm90 only, 16-bit queries with keys of their type
    (an fp8 cache matters only when a prefix is gathered from it), head_dim 128, 128-row blocks."""
    from attention import hopper_prefill as hp
    ok = functools.partial(hp.unavailable_reason, "cuda", 90, torch.bfloat16, torch.bfloat16, 128, 128)
    if hp.gluon is None:
        assert "Gluon" in ok()
        return
    assert ok() is None
    assert "sm90" in hp.unavailable_reason("cuda", 100, torch.bfloat16, torch.bfloat16, 128, 128)
    assert "sm90" in hp.unavailable_reason("cpu", None, torch.bfloat16, torch.bfloat16, 128, 128)
    assert "float8" in hp.unavailable_reason("cuda", 90, torch.bfloat16, torch.float8_e4m3fn, 128, 128)
    assert "float32" in hp.unavailable_reason("cuda", 90, torch.float32, torch.float32, 128, 128)
    assert "head_dim" in hp.unavailable_reason("cuda", 90, torch.float16, torch.float16, 64, 128)
    assert hp.device_capability(torch.device("cpu")) is None


def _gluon_missing() -> str | None:
    if DEVICE != "cuda":
        return "needs a CUDA GPU"
    from attention.hopper_prefill import device_capability, unavailable_reason
    return unavailable_reason(DEVICE, device_capability(torch.device(DEVICE)), torch.bfloat16, torch.bfloat16, 128, 128)


@pytest.mark.gpu
@pytest.mark.skipif(_gluon_missing() is not None, reason=str(_gluon_missing()))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 64])
def test_gpu_gluon_prefill(dtype: torch.dtype, block_size: int) -> None:
    """The Hopper (Gluon) prefill blocks equal the unified kernel's and the reference, at the
    Llama-3-8B head layout: one 2k prompt; prompts of many lengths beside decode rows over long
    contexts (only prefill rows decide the kernel) with padding; prefill rows over cached
    prefixes gathered into rows (NaN in every cache slot no request may read). The default
    (None) takes the Gluon kernel for all of them; a prefix read page by page keeps the
    unified kernel, and forcing Gluon there is an error that says why."""
    scale = 128 ** -0.5
    cases = {"2k": ([2048], [0], 0, 0), "mixed": ([1, 300, 2, 77, 1, 1000, 33], [900, 0, 0, 0, 4000, 0, 0], 3, 5),
             "gathered": ([1, 700, 1, 300, 64, 5], [900, 2000, 4000, 513, 8192, 0], 2, 5)}
    for name, (q_lens, ctx, pad_reqs, pad_tokens) in cases.items():
        b = make_batch(q_lens, ctx, num_heads=32, num_kv_heads=8, head_dim=128, block_size=block_size,
                       pad_reqs=pad_reqs, pad_tokens=pad_tokens, device=DEVICE, dtype=dtype,
                       poison=float("nan"), seed=block_size + len(name))
        ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, scale)
        cache = b.kv_cache.clone()
        write_kv_cache_triton(b.k, b.v, cache, b.md.slot_mapping)
        gather = True if name == "gathered" else None
        outs = {kern: unified_attention(b.q, b.k, b.v, cache, b.md, scale, prefix_gather=gather, prefill_kernel=kern)
                for kern in ("gluon", "triton", None)}
        n = b.md.num_actual_tokens
        for kern, out in outs.items():
            assert not torch.isnan(out).any(), (name, kern)
            assert rel_err(out[:n], ref[:n].to(out.device)) < 3e-3, (name, kern)
            assert torch.count_nonzero(out[n:]) == 0, (name, kern)
        assert torch.equal(outs[None], outs["gluon"]), name
        assert rel_err(outs["gluon"][:n], outs["triton"][:n]) < 3e-3, name
    # an fp8 cache: rows without a cached prefix read only their new (bf16) keys, so Gluon serves
    # them; a prefix gathered from that cache is fp8 and stays with the unified kernel
    fp8 = torch.float8_e4m3fn
    b8 = make_batch([300, 1, 77], [0, 900, 0], num_heads=32, num_kv_heads=8, head_dim=128, block_size=block_size,
                    pad_reqs=1, pad_tokens=3, device=DEVICE, dtype=dtype, seed=3)
    k8, v8 = (t.to(fp8).to(dtype) for t in (b8.k, b8.v))
    cache8 = b8.kv_cache.to(fp8)
    write_kv_cache_triton(k8, v8, cache8, b8.md.slot_mapping)
    ref8 = dense_reference(b8.q, k8, v8, cache8, b8.md, scale)
    n8 = b8.md.num_actual_tokens
    out8 = unified_attention(b8.q, k8, v8, cache8, b8.md, scale, num_splits=1, prefill_kernel="gluon")
    assert rel_err(out8[:n8], ref8[:n8].to(out8.device)) < 3e-3 and torch.count_nonzero(out8[n8:]) == 0
    with pytest.raises(ValueError, match="float8"):
        unified_attention(b.q, b.k, b.v, cache.to(fp8), b.md, scale, prefix_gather=True, prefill_kernel="gluon")
    paged = unified_attention(b.q, b.k, b.v, cache, b.md, scale, prefix_gather=False)
    assert rel_err(paged[:n], ref[:n].to(paged.device)) < 3e-3
    with pytest.raises(ValueError, match="page by page"):
        unified_attention(b.q, b.k, b.v, cache, b.md, scale, prefix_gather=False, prefill_kernel="gluon")


@pytest.mark.cpu
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("gather", [True, False])
def test_fp8_kv_cache(splits: int, gather: bool) -> None:
    """An fp8 (e4m3) cache: the write stores K/V rounded to fp8 and the kernels read them back
    into the query's dtype, for decode rows, prefill rows over cached prefixes (paged and
    gathered) and splits. The new K/V here are fp8-representable, so the reference is exact."""
    fp8 = torch.float8_e4m3fn
    b = make_batch([40, 1, 33, 2, 1], [21, 50, 32, 16, 7], block_size=8, pad_reqs=1, pad_tokens=3,
                   device=DEVICE, seed=17)
    k, v = (t.to(fp8).float() for t in (b.k, b.v))
    cache = b.kv_cache.to(fp8)
    ref = dense_reference(b.q, k, v, cache, b.md, 0.125)
    want = cache.clone()
    write_kv_cache_triton(k, v, cache, b.md.slot_mapping)
    write_kv_cache(k, v, want, b.md.slot_mapping)  # the torch reference's write: the same bytes
    assert torch.equal(cache[:, 1:].view(torch.uint8), want[:, 1:].view(torch.uint8))  # (not the null block)
    out = unified_attention(b.q, k, v, cache, b.md, 0.125, num_splits=splits, min_split_tokens=16,
                            configs=(None, TileConfig(16, 4, 16, 4, 2)), prefix_gather=gather)
    n = b.md.num_actual_tokens
    assert out.dtype == b.q.dtype and rel_err(out[:n], ref[:n]) < 1e-5
    assert torch.count_nonzero(out[n:]) == 0


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
def test_gpu_fp8_widening_is_exact() -> None:
    """Every finite e4m3 byte (subnormals, +-448) widens to its exact bf16 value on the
    decode path: one key per request gives softmax weight 1, so each output row is its V row;
    the bytes fill V in order, so a tile assembled out of order shows too. Where PTX widens the
    tiles (``widen_fp8_by_ptx``) this checks that code."""
    from attention.triton_attn import widen_fp8_by_ptx

    fp8 = torch.float8_e4m3fn
    b = make_batch([1, 1, 1], [0, 0, 0], num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
                   device=DEVICE, dtype=torch.bfloat16, seed=3)
    codes = torch.arange(b.v.numel(), device=DEVICE) % 256
    codes[((codes & 0x7F) == 0x7F) | (codes == 0x80)] = 0  # the two NaN bytes; -0 (the write may store +0)
    v = codes.to(torch.uint8).view(fp8).view(b.v.shape)
    k = b.k.to(fp8)
    cache = b.kv_cache.to(fp8)
    write_kv_cache_triton(k.to(torch.bfloat16), v.to(torch.bfloat16), cache, b.md.slot_mapping)
    assert torch.equal(cache[1][b.md.slot_mapping // 16, b.md.slot_mapping % 16].view(torch.uint8),
                       v.view(torch.uint8))
    out = unified_attention(b.q, k.to(torch.bfloat16), v.to(torch.bfloat16), cache, b.md, 128 ** -0.5)
    want = v.to(torch.bfloat16).repeat_interleave(4, dim=1)  # query head h reads KV head h // 4
    nvidia_sm89 = torch.version.hip is None and torch.cuda.get_device_capability() >= (8, 9)
    assert widen_fp8_by_ptx(b.q, cache) == nvidia_sm89
    assert torch.equal(out, want)


@pytest.mark.cpu
def test_fp8_kv_write_saturates() -> None:
    """Values past the e4m3 range are stored as +-448 (a plain cast gives NaN), by both writes;
    the backend takes an fp8 cache and refuses another foreign dtype with the reason."""
    fp8 = torch.float8_e4m3fn
    k = torch.tensor([[[1000.0, -1000.0, 3.3, 0.0]]], device=DEVICE)
    slots = torch.tensor([5], device=DEVICE)
    for write in (write_kv_cache_triton, write_kv_cache):
        cache = torch.zeros(2, 2, 4, 1, 4, dtype=fp8, device=DEVICE)
        write(k, -k, cache, slots)
        got = cache[:, 1, 1, 0].float().cpu()
        assert got[0].tolist() == [448.0, -448.0, 3.25, 0.0] and got[1].tolist() == [-448.0, 448.0, -3.25, 0.0]
    assert TritonAttentionBackend.kv_cache_dtype_reason(fp8, torch.bfloat16, DEVICE) is None
    assert "int8" in TritonAttentionBackend.kv_cache_dtype_reason(torch.int8, torch.bfloat16, DEVICE)
    assert "xpu" in TritonAttentionBackend.kv_cache_dtype_reason(fp8, torch.bfloat16, "xpu")
    b = make_batch([3], [5], device=DEVICE)
    be = TritonAttentionBackend(8, 2, 64, 0.125)
    with pytest.raises(ValueError, match="float16"):
        be(b.q, b.k, b.v, b.kv_cache.half(), b.md)


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA GPU")
def test_gpu_fp8_kv_cache() -> None:
    """bf16 queries over an fp8 cache at the Llama-3-8B head layout, compiled: decode rows, and
    prefill rows over cached prefixes, paged and gathered (TMA descriptors on Hopper)."""
    fp8 = torch.float8_e4m3fn
    b = make_batch([1, 700, 1, 300, 64], [900, 2000, 4000, 513, 8192], num_heads=32, num_kv_heads=8,
                   head_dim=128, block_size=16, pad_reqs=2, pad_tokens=5, device=DEVICE,
                   dtype=torch.bfloat16, seed=5)
    k, v = (t.to(fp8).to(torch.bfloat16) for t in (b.k, b.v))
    cache = b.kv_cache.to(fp8)
    ref = dense_reference(b.q, k, v, cache, b.md, 128 ** -0.5)
    write_kv_cache_triton(k, v, cache, b.md.slot_mapping)
    n = b.md.num_actual_tokens
    for gather in (True, False):
        out = unified_attention(b.q, k, v, cache, b.md, 128 ** -0.5, prefix_gather=gather)
        assert rel_err(out[:n], ref[:n].to(out.device)) < 3e-3
        assert torch.count_nonzero(out[n:]) == 0
