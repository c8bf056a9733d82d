"""The Triton backend's tiles: which tile (query rows, key rows, warps, stages) and how many KV
splits a launch of ``attention.triton_kernels`` takes on its device, from the shapes and the
device's SM count and shared memory (never from device data, so graph replays agree)."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

MIN_SPLIT_TOKENS = 64
MAX_SPLITS = 64


@functools.lru_cache(maxsize=None)
def _device_props(device_type: str, index: int) -> dict:
    if device_type == "cpu":
        return {}
    from triton.runtime import driver
    return dict(driver.active.utils.get_device_properties(index))


def device_sm_count(device_type: str, index: int) -> int:
    """Streaming multiprocessors (CUDA) / compute units (XPU); 4 under the interpreter."""
    if device_type == "cpu":
        return 4
    props = _device_props(device_type, index)
    return int(props.get("multiprocessor_count") or props.get("max_compute_units") or 64)


def _device_index(device: torch.device) -> int:
    if device.index is None and device.type != "cpu":
        return torch.accelerator.current_device_index()
    return device.index or 0


def _sm_count(device: torch.device) -> int:
    return device_sm_count(device.type, _device_index(device))


def _smem_limit(device: torch.device) -> int | None:
    """Shared memory per program (bytes) if the driver tells; None = no limit (interpreter)."""
    value = _device_props(device.type, _device_index(device)).get("max_shared_mem")
    return int(value) if value else None


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_q: int
    block_n: int
    num_warps: int
    num_stages: int


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def decode_config(g_pad: int, head_dim: int, dtype: torch.dtype) -> TileConfig:
    """One token x the group's query heads per program (rows padded to the dot minimum 16).
    Tuned on an H100 (Llama-3-8B decode): 64-key tiles, 4 warps, 2 stages. Over an fp8 cache on
    an H200 it is the best tile for 256 rows of 512-640 keys and within 3% at 128 x 1k, 6-13%
    behind the best at 4k-16k keys (``benchmarks/gpu_decode_tiles.py --kv-dtype fp8``)."""
    wide = dtype == torch.float32 or head_dim > 128
    return TileConfig(max(16, g_pad), 1, 32 if wide else 64, 4, 2)


def prefill_config(g_pad: int, head_dim: int, dtype: torch.dtype, max_query_len: int) -> TileConfig:
    """128 query rows (tokens x group heads) x 128 keys, 8 warps, 3 stages for 16-bit d<=128
    (H100-tuned; its shared memory holds Q plus three K/V stages); smaller tiles otherwise."""
    wide = dtype == torch.float32 or head_dim > 128
    rows = 64 if wide else 128
    block_q = max(1, min(rows // g_pad, _pow2(max(2, max_query_len))))
    block_m = max(16, block_q * g_pad)
    big = block_m >= 128
    return TileConfig(block_m, block_q, 32 if wide else (128 if big else 64),
                      8 if big else 4, 2 if wide else 3)


def _prefill_tile(q: torch.Tensor, g_pad: int, max_query_len: int) -> TileConfig:
    """The default prefill tile for queries like ``q`` ``[T, Hq, D]`` on its device."""
    head_dim = q.shape[-1]
    return fit_shared_memory(prefill_config(g_pad, head_dim, q.dtype, max_query_len), head_dim,
                             q.element_size(), _smem_limit(q.device))


def choose_num_splits(programs: int, sm_count: int) -> int:
    """Split the KV range when a launch has fewer programs than SMs: aim at two per SM."""
    if programs >= sm_count:
        return 1
    return max(1, min(MAX_SPLITS, -(-2 * sm_count // max(programs, 1))))


def prefix_cascade_plan(dec: TileConfig, g_pad: int, num_reqs: int, num_kv_heads: int, head_dim: int,
                        elem_bytes: int, smem: int | None, sm_count: int) -> tuple[TileConfig, int]:
    """(tile, splits) of ``cascade_prefix_kernel``: 128 query rows (requests x group heads) a
    program whatever the batch (one compiled variant per model), the decode tile's keys, and the
    shared prefix split over about one wave of programs. Only shapes decide it (the prefix
    length is read on the device), so a captured graph's launches fit every prefix."""
    rows = max(g_pad, 128)
    cfg = fit_shared_memory(TileConfig(rows, rows // g_pad, dec.block_n, 8, 3), head_dim, elem_bytes, smem)
    programs = -(-num_reqs // cfg.block_q) * num_kv_heads
    return cfg, max(1, min(sm_count // programs, MAX_SPLITS // 2))


def fit_shared_memory(cfg: TileConfig, head_dim: int, elem_bytes: int,
                      limit: int | None) -> TileConfig:
    """Shrink stages, then key tiles, then query rows until Q plus the K/V stages fit
    (with slack for Triton's scratch): e.g. A100 or consumer GPUs under the H100 tiles."""
    def need(c: TileConfig) -> int:
        return (c.block_m + 2 * c.num_stages * c.block_n) * head_dim * elem_bytes + 1024
    while limit is not None and need(cfg) > limit:
        if cfg.num_stages > 2:
            cfg = dataclasses.replace(cfg, num_stages=cfg.num_stages - 1)
        elif cfg.block_n > 32:
            cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
        elif cfg.block_m > 16 and cfg.block_q > 1:
            cfg = dataclasses.replace(cfg, block_m=cfg.block_m // 2, block_q=cfg.block_q // 2,
                                      num_warps=4)
        else:
            break
    return cfg
