"""Device-agnostic memory profiling (platform ops only): GPU and XPU runners share it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, TypeVar

from platforms import Platform

T = TypeVar("T")


@dataclass
class MemoryProfile:
    """Bytes. ``kv_budget`` = utilisation x total - weights - activation peak - non-torch."""

    total: int
    weights: int
    peak_activation: int
    non_torch: int
    utilization: float

    @property
    def kv_budget(self) -> int:
        return int(self.total * self.utilization) - self.weights - self.peak_activation - self.non_torch

    def describe(self) -> str:
        mib = 2**20
        return (f"{self.utilization:.2f} x {self.total / mib:,.0f} MiB total - {self.weights / mib:,.0f} MiB "
                f"weights - {self.peak_activation / mib:,.0f} MiB activation peak - "
                f"{self.non_torch / mib:,.0f} MiB non-torch")


def measure_allocation(platform: Platform, fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn`` and return its result with the bytes it left allocated (e.g. weights)."""
    platform.synchronize()
    before = platform.memory_allocated()
    out = fn()
    platform.synchronize()
    return out, platform.memory_allocated() - before


def profile_memory(platform: Platform, dummy_step: Callable[[], object], weights: int,
                   utilization: float) -> MemoryProfile:
    """Run the worst-case step and account for everything the KV cache cannot use."""
    platform.empty_cache()
    platform.synchronize()
    platform.reset_peak_memory_stats()
    base = platform.memory_allocated()
    dummy_step()
    platform.synchronize()
    peak = platform.max_memory_allocated() - base
    free, total = platform.mem_get_info()
    non_torch = max((total - free) - platform.memory_reserved(), 0)
    platform.empty_cache()
    return MemoryProfile(total, weights, peak, non_torch, utilization)
