"""The flash-attn backend: clear refusals everywhere; on a GPU with flash-attn, the reference."""
import math
import subprocess
import sys

import pytest
import torch

from attention.flash_attn import FlashAttentionBackend, flash_flavour
from tests.attention.batch_utils import dense_reference, make_batch, rel_err


@pytest.mark.cpu
def test_refuses_cpu_and_float32_with_a_reason() -> None:
    reason = FlashAttentionBackend.unsupported_reason("cpu", torch.bfloat16, 128, 16)
    assert reason and ("not importable" in reason or "cuda" in reason)
    reason = FlashAttentionBackend.unsupported_reason("cuda", torch.float32, 128, 16)
    assert reason and ("not importable" in reason or "float32" in reason)


@pytest.mark.cpu
def test_import_is_lazy() -> None:
    """Importing the backend module loads no flash_attn; probing reports a reason or a flavour."""
    code = "import sys, attention.flash_attn; print('flash_attn' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"
    flavour, why = flash_flavour()
    assert flavour in ("fa4", "fa2", None)
    assert (flavour is None) == bool(why)


HAVE_FLASH = torch.accelerator.is_available() and flash_flavour()[0] is not None


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_FLASH, reason="needs a CUDA GPU with flash-attn installed")
@pytest.mark.parametrize("block_size", [16, 128, 256])
def test_gpu_matches_dense_reference(block_size: int) -> None:
    if FlashAttentionBackend.unsupported_reason("cuda", torch.bfloat16, 128, block_size):
        pytest.skip(FlashAttentionBackend.unsupported_reason("cuda", torch.bfloat16, 128, block_size))
    b = make_batch([1, 300, 1, 77], [900, 0, 4000, 513], num_heads=32, num_kv_heads=8,
                   head_dim=128, block_size=block_size, pad_reqs=2, pad_tokens=3,
                   device="cuda", dtype=torch.bfloat16)
    scale = 1 / math.sqrt(128)
    ref = dense_reference(b.q, b.k, b.v, b.kv_cache, b.md, scale)
    out = FlashAttentionBackend(32, 8, 128, scale)(b.q, b.k, b.v, b.kv_cache, b.md)
    assert rel_err(out, ref) < 1e-2
    assert torch.count_nonzero(out[b.md.num_actual_tokens:]) == 0
    prof = make_batch([64, 1, 9], [0, 0, 0], num_heads=32, num_kv_heads=8, head_dim=128,
                      device="cuda", dtype=torch.bfloat16, pad_tokens=2)
    out = FlashAttentionBackend(32, 8, 128, scale)(prof.q, prof.k, prof.v, None, prof.md)
    assert rel_err(out, dense_reference(prof.q, prof.k, prof.v, None, prof.md, scale)) < 1e-2
