"""The XLA attention backend: its static-shape math against a naive dense reference (on the
CPU, no torch_xla needed), the same on XLA's device, and the Pallas path's inputs against
torch_xla's own non-kernel reference of the ragged paged attention kernel."""
import importlib.util

import pytest
import torch

from attention.torch_ref import write_kv_cache
from attention.xla_attn import XlaAttentionBackend, pallas_inputs, static_attention
from tests.attention.batch_utils import dense_reference, make_batch, rel_err

needs_xla = pytest.mark.skipif(importlib.util.find_spec("torch_xla") is None,
                               reason="torch_xla is not installed (the TPU CI step's venv has it)")

CASES = {
    "mixed": ([1, 7, 1, 12], [20, 0, 33, 9]),
    "decodes": ([1, 1, 1], [5, 40, 16]),
    "prefill_only": ([9], [0]),
    "chunk_after_prefix": ([16], [31]),
}


def _static_batch(name: str, block_size: int, device: str = "cpu"):
    """A padded batch shaped as the runner pads it: extra request rows, padding tokens, the
    block table as wide as the longest request's, max_query_len = the padded token count."""
    q_lens, ctx = CASES[name]
    b = make_batch(q_lens, ctx, block_size=block_size, pad_reqs=3, pad_tokens=5, seed=len(name), device=device)
    if not all(q == 1 for q in q_lens):
        b.md.max_query_len = b.q.shape[0]
    return b


@pytest.mark.cpu
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("block_size", [4, 16])
def test_static_path_matches_dense(name: str, block_size: int) -> None:
    b = _static_batch(name, block_size)
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 0.2)
    out = XlaAttentionBackend(8, 2, 64, 0.2)(b.q, b.k, b.v, b.kv_cache, b.md)
    n = b.md.num_actual_tokens
    assert rel_err(out[:n], ref[:n]) < 1e-5
    assert out.shape == b.q.shape and bool(out.isfinite().all()), "padding tokens stay finite"


@pytest.mark.cpu
@pytest.mark.parametrize("tile", [1, 3, 5, 64])
def test_query_tiles_of_any_size_give_the_same_result(tile: int) -> None:
    """Requests spanning several tiles, tiles ending mid-request, one tile per request."""
    b = _static_batch("mixed", 4)
    write_kv_cache(b.k, b.v, b.kv_cache, b.md.slot_mapping)
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 0.2)
    out = static_attention(b.q, b.k, b.v, b.kv_cache, b.md, 0.2, tile=tile)
    n = b.md.num_actual_tokens
    assert rel_err(out[:n], ref[:n]) < 1e-5 and bool(out.isfinite().all())


@pytest.mark.cpu
def test_static_path_writes_new_kv_at_its_slots() -> None:
    b = _static_batch("mixed", 4)
    XlaAttentionBackend(8, 2, 64, 0.2)(b.q, b.k, b.v, b.kv_cache, b.md)
    n, bs = b.md.num_actual_tokens, b.kv_cache.shape[2]
    slots = b.md.slot_mapping[:n]
    torch.testing.assert_close(b.kv_cache[0][slots // bs, slots % bs], b.k[:n], rtol=0, atol=0)
    torch.testing.assert_close(b.kv_cache[1][slots // bs, slots % bs], b.v[:n], rtol=0, atol=0)


@pytest.mark.cpu
def test_static_path_without_cache_is_causal_over_new_tokens() -> None:
    b = make_batch([5, 3], [0, 0], pad_reqs=2, pad_tokens=4)
    b.md.max_query_len = b.q.shape[0]
    ref = dense_reference(b.q, b.k, b.v, None, b.md, 0.3)
    for tile in (2, 16):
        out = static_attention(b.q, b.k, b.v, None, b.md, 0.3, tile=tile)
        assert rel_err(out[:8], ref[:8]) < 1e-5


@pytest.mark.tpu
@needs_xla
@pytest.mark.parametrize("name", ["mixed", "decodes"])
def test_static_path_on_the_xla_device_matches_the_cpu(name: str) -> None:
    import torch_xla

    dev = torch_xla.device()
    cpu, xla = _static_batch(name, 4), _static_batch(name, 4, device=dev)
    want = XlaAttentionBackend(8, 2, 64, 0.2)(cpu.q, cpu.k, cpu.v, cpu.kv_cache, cpu.md)
    got = XlaAttentionBackend(8, 2, 64, 0.2)(xla.q, xla.k, xla.v, xla.kv_cache, xla.md)
    n = cpu.md.num_actual_tokens
    torch.testing.assert_close(got.cpu()[:n], want[:n], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xla.kv_cache.cpu(), cpu.kv_cache, rtol=0, atol=0)


@pytest.mark.tpu
@needs_xla
@pytest.mark.parametrize("name", CASES)
def test_pallas_inputs_match_the_kernels_reference_semantics(name: str) -> None:
    """The kernel needs a TPU; torch_xla's non-kernel reference of the same op (same
    arguments, a host loop) checks our layout re-interleave and argument mapping here."""
    from torch_xla.experimental.custom_kernel import _ragged_paged_attention_nonkernel

    b = _static_batch(name, 4)
    write_kv_cache(b.k, b.v, b.kv_cache, b.md.slot_mapping)
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 0.2)
    q, pages, kv_lens, page_indices, cu_q_lens, num_seqs = pallas_inputs(b.q, b.kv_cache, b.md)
    assert int(num_seqs[0]) == b.md.num_reqs and num_seqs.dtype == torch.int32
    assert pages.shape == (b.kv_cache.shape[1], b.kv_cache.shape[2], 4, 64)
    out = _ragged_paged_attention_nonkernel(q, pages, kv_lens, page_indices, cu_q_lens, num_seqs,
                                            None, None, sm_scale=0.2)
    n = b.md.num_actual_tokens
    assert rel_err(out[:n], ref[:n]) < 1e-5


@pytest.mark.tpu
@needs_xla
def test_compiled_step_updates_the_cache_in_place() -> None:
    """The cache is a donated buffer written by one index_copy_: a compiled decode step must
    cost far less than copying the cache (it copied the whole cache every step before)."""
    import time

    import torch_xla
    import torch_xla.core.xla_model as xm

    dev = torch_xla.device()
    b = make_batch([1, 1, 1], [5, 40, 16], block_size=16, spare_blocks=4000, device=dev)  # 65 MB
    be = XlaAttentionBackend(8, 2, 64, 0.2)
    step = torch.compile(be.forward, backend="openxla", fullgraph=True, dynamic=False)

    def seconds(fn) -> float:
        fn()
        xm.wait_device_ops()
        start = time.perf_counter()
        for _ in range(5):
            fn()
        xm.wait_device_ops()
        return time.perf_counter() - start

    with torch.no_grad():
        want = be.forward(b.q.cpu(), b.k.cpu(), b.v.cpu(), b.kv_cache.cpu(), make_batch(
            [1, 1, 1], [5, 40, 16], block_size=16, spare_blocks=4000).md)
        forward = seconds(lambda: step(b.q, b.k, b.v, b.kv_cache, b.md).cpu())
        copy = seconds(lambda: (b.kv_cache.clone(), torch_xla.sync()))
    torch.testing.assert_close(step(b.q, b.k, b.v, b.kv_cache, b.md).cpu(), want, rtol=1e-5, atol=1e-5)
    assert forward < copy / 3, f"5 steps {forward:.3f}s vs 5 cache copies {copy:.3f}s"
