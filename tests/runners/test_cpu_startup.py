"""CPU startup: no worst-case dummy forward (one short step), KV blocks from RAM, and a KV cache
whose zero pages the OS maps lazily. The startup time itself is a benchmark
(benchmarks/cpu_startup.py), not a timed test."""
import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from platforms.cpu import CpuPlatform
from runners.cpu import CPU_KV_CACHE_CAP, WARMUP_TOKENS, CPURunner
from runners.kv_cache import host_zeros

pytestmark = pytest.mark.cpu


class _RAM(CpuPlatform):
    """The host with ``free`` bytes of free RAM."""

    def __init__(self, free: int) -> None:
        super().__init__()
        self.free = free

    def mem_get_info(self) -> tuple[int, int]:
        return self.free, 2 * self.free


def _runner(free: int, **kw) -> CPURunner:
    args = {**dict(device="cpu", max_model_len=256, max_num_seqs=64, max_num_batched_tokens=8192), **kw}
    r = CPURunner(EngineConfig(**args), _RAM(free))
    r.load_model()
    return r


def test_profile_run_is_one_short_step():
    r = _runner(2**30)
    steps = []
    real = r._forward
    r._forward = lambda step: steps.append(int(step.input_ids.shape[0])) or real(step)
    r.profile_run()
    assert steps == [WARMUP_TOKENS] and WARMUP_TOKENS < r.max_num_tokens


@pytest.mark.parametrize("free, expected", [
    (64 * 2**20, 32 * 2**20),  # half of free RAM
    (64 * 2**30, CPU_KV_CACHE_CAP),  # capped at 4 GiB
])
def test_kv_blocks_come_from_ram(free, expected):
    r = _runner(free, max_model_len=2048, max_num_seqs=2048)  # more blocks are useful than 4 GiB holds
    assert r.profile_run() == expected // r.kv_cache_spec.bytes_per_block


def test_kv_blocks_never_exceed_what_can_be_used():
    r = _runner(2**34)
    assert r.profile_run() == 64 * (256 // 16) + 1


def test_kv_blocks_too_few_for_one_request_is_a_clear_error():
    r = _runner(2**20, max_model_len=2048)
    with pytest.raises(RuntimeError, match="cannot hold one request of max_model_len=2048.*half of free RAM"):
        r.profile_run()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_zeros(dtype):
    t = host_zeros((2, 3, 4, 5), dtype)
    assert t.shape == (2, 3, 4, 5) and t.dtype == dtype and t.is_contiguous()
    assert t.data_ptr() % 64 == 0 and not t.any()
    t[1, 2] = 1.5
    assert float(t.sum()) == 1.5 * 20
    big = host_zeros((2**28,), torch.float32)  # 1 GiB, untouched: allocated without writing it
    assert big.numel() == 2**28 and not big[:: 2**20].any()
    assert isinstance(np.asarray(big[:4]), np.ndarray)
