"""Without the triton package (a CPU-only install), everything that needs it says so and how to get it;
the default CPU path does not need it."""
import sys

import pytest
import torch

from attention import get_attn_backend
from attention.triton_attn import TritonAttentionBackend
from models import fused_ops

pytestmark = pytest.mark.cpu


@pytest.fixture
def no_triton(monkeypatch):
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    fused_ops._triton_importable.cache_clear()
    yield
    fused_ops._triton_importable.cache_clear()


def test_triton_backend_names_the_missing_package(no_triton):
    reason = TritonAttentionBackend.unsupported_reason("cuda", torch.float16, 128, 16)
    assert reason.startswith("the triton package is not installed") and "pip install triton" in reason
    with pytest.raises(RuntimeError, match="attention backend 'triton' cannot run here: the triton package is not "
                                           "installed"):
        get_attn_backend("triton", "cpu", torch.float32, 64, 16)
    # an automatic choice skips it and says why only if nothing else runs
    assert get_attn_backend(None, "cpu", torch.float32, 64, 16, ("triton", "torch")).__name__ == "TorchAttentionBackend"


def test_fused_ops_on_names_the_missing_package(no_triton):
    x = torch.ones(2, 8)
    with fused_ops.fused_ops_mode("auto"):
        assert not fused_ops.fused_ops_enabled(x)
    with fused_ops.fused_ops_mode("on"), pytest.raises(RuntimeError, match="=on needs the triton package"):
        fused_ops.fused_ops_enabled(x)
