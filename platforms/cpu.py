"""The CPU platform: real memory figures from the OS (psutil and /proc)."""
from __future__ import annotations

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
        # CPUs without bf16 units run it slowly and less exactly: "auto" means float32 here.
        return torch.float32 if requested == "auto" else getattr(torch, requested)

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
