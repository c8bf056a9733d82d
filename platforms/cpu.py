"""The CPU platform: real memory figures from the OS (psutil and /proc)."""
from __future__ import annotations

import functools
import gc
import os
import resource
from typing import Any, ClassVar

import psutil
import torch

from platforms.interface import Platform


def _peak_rss() -> int:
    """Peak resident set size since the last reset (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.lru_cache(maxsize=None)
def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively (its flags name AVX512_BF16 or AMX-BF16; Linux
    reports them in /proc/cpuinfo, other systems count as no)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in _BF16_FLAGS)
    except OSError:
        pass
    return False


class CpuPlatform(Platform):
    name: ClassVar[str] = "cpu"
    device_type: ClassVar[str] = "cpu"
    runner_cls: ClassVar[str] = "runners.cpu:CPURunner"
    attention_backends: ClassVar[tuple[str, ...]] = ("torch",)

    def __init__(self) -> None:
        self._process = psutil.Process(os.getpid())
        self._peak_floor = 0  # used where the OS cannot reset the peak

    @classmethod
    def is_available(cls) -> bool:
        return True

    @classmethod
    def check_device_index(cls, index: int) -> None:
        if index != 0:
            raise ValueError(f"the CPU platform has one device (index 0), got index {index}: use device='cpu'")

    def device(self, index: int | None = None) -> torch.device:
        if index is not None:
            self.check_device_index(index)
        return torch.device("cpu")

    def resolve_dtype(self, requested: str, config_dtype: str | None) -> torch.dtype:
        """Under "auto", bfloat16 where the CPU has bf16 dot-product units (x86 AVX512_BF16 or AMX:
        matrix products read half the bytes and run ~3x faster), unless the checkpoint is
        float32; float32 elsewhere (without those units bf16 is emulated: slow). float16, slow
        on CPUs, becomes bfloat16 under "auto"."""
        if requested != "auto":
            return getattr(torch, requested)
        if native_bf16() and config_dtype != "float32":
            return torch.bfloat16
        return torch.float32

    def synchronize(self) -> None:
        pass  # CPU ops complete before they return

    def empty_cache(self) -> None:
        gc.collect()

    def mem_get_info(self) -> tuple[int, int]:
        vm = psutil.virtual_memory()
        return int(vm.available), int(vm.total)

    def memory_stats(self) -> dict[str, Any]:
        mi = self._process.memory_info()
        free, total = self.mem_get_info()
        return {"rss_bytes": int(mi.rss), "vms_bytes": int(mi.vms), "peak_rss_bytes": self.max_memory_allocated(),
                "free_bytes": free, "total_bytes": total}

    def memory_allocated(self) -> int:
        return int(self._process.memory_info().rss)

    def memory_reserved(self) -> int:
        return int(self._process.memory_info().rss)

    def max_memory_allocated(self) -> int:
        return max(_peak_rss(), self._peak_floor, self.memory_allocated())

    def reset_peak_memory_stats(self) -> None:
        # Linux resets VmHWM to the current RSS when "5" is written to clear_refs.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._peak_floor = 0
        except OSError:
            self._peak_floor = self.memory_allocated()

    def set_device(self, index: int) -> None:
        self.check_device_index(index)
