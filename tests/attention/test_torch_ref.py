"""The torch reference against a naive per-token dense softmax over exactly gathered keys."""
import pytest
import torch

from attention.torch_ref import gather_kv, write_kv_cache
from tests.attention.batch_utils import dense_reference, make_batch, rel_err, torch_reference_backend

pytestmark = pytest.mark.cpu

CASES = {
    "mixed": ([1, 7, 1, 12], [20, 0, 33, 9]),
    "decodes": ([1, 1, 1], [5, 40, 16]),
    "prefill_only": ([9], [0]),
    "chunk_after_prefix": ([16], [31]),
}


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("block_size", [4, 16])
def test_reference_matches_dense(name: str, block_size: int) -> None:
    q_lens, ctx = CASES[name]
    b = make_batch(q_lens, ctx, block_size=block_size, pad_reqs=1, pad_tokens=2, seed=len(name))
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, 0.2)
    out = torch_reference_backend(8, 2, 64, 0.2)(b.q, b.k, b.v, b.kv_cache, b.md)
    assert rel_err(out, ref) < 1e-5
    assert torch.count_nonzero(out[b.md.num_actual_tokens:]) == 0


def test_reference_without_cache_is_causal_over_new_tokens() -> None:
    b = make_batch([5, 3], [0, 0], pad_tokens=1)
    ref = dense_reference(b.q, b.k, b.v, None, b.md, 0.3)
    out = torch_reference_backend(8, 2, 64, 0.3)(b.q, b.k, b.v, None, b.md)
    assert rel_err(out, ref) < 1e-5


def test_write_then_gather_roundtrip() -> None:
    b = make_batch([3, 2], [5, 0], block_size=4, pad_tokens=2)
    write_kv_cache(b.k, b.v, b.kv_cache, b.md.slot_mapping)
    keys, vals = gather_kv(b.kv_cache, b.md.block_table[0, :2])
    torch.testing.assert_close(keys[5:8], b.k[0:3])
    torch.testing.assert_close(vals[5:8], b.v[0:3])


def test_dense_reference_sees_only_the_causal_prefix() -> None:
    """Guards the oracle itself: a later key changes earlier outputs only if visible."""
    b = make_batch([4], [0])
    before = dense_reference(b.q, b.k, b.v, None, b.md, 0.5)
    b.v[3] += 10.0
    after = dense_reference(b.q, b.k, b.v, None, b.md, 0.5)
    torch.testing.assert_close(after[:3], before[:3])
    assert not torch.allclose(after[3], before[3])
