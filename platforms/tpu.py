"""TPUs through torch_xla (imported lazily; with PJRT_DEVICE=CPU it runs on the host CPU)."""
from __future__ import annotations

import importlib.util
import os
from typing import Any, ClassVar

import psutil
import torch

from platforms.interface import Platform


def _xm() -> Any:
    import torch_xla.core.xla_model as xm  # lazy: heavy, and absent on most machines

    return xm


class TpuPlatform(Platform):
    name: ClassVar[str] = "tpu"
    device_type: ClassVar[str] = "xla"
    runner_cls: ClassVar[str] = "runners.tpu:TPURunner"
    attention_backends: ClassVar[tuple[str, ...]] = ("xla", "torch")
    static_shapes: ClassVar[bool] = True

    @classmethod
    def is_available(cls) -> bool:
        # Auto-detect only a real TPU: torch_xla on other PJRT devices must be asked for by name.
        if importlib.util.find_spec("torch_xla") is None:
            return False
        pjrt = os.environ.get("PJRT_DEVICE", "").upper()
        return pjrt == "TPU" or (not pjrt and os.path.exists("/dev/accel0"))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("torch_xla") is None:
            return (f"torch_xla is not installed (pip install torch_xla of the version matching torch "
                    f"{torch.__version__}; PJRT_DEVICE=CPU runs it on the host)")
        return None

    def device(self, index: int | None = None) -> torch.device:
        import torch_xla

        return torch_xla.device() if index is None else torch_xla.device(index)

    def resolve_dtype(self, requested: str, config_dtype: str | None) -> torch.dtype:
        if requested != "auto":
            return getattr(torch, requested)
        if os.environ.get("PJRT_DEVICE", "").upper() == "CPU":
            return torch.float32  # the XLA CPU client: keep it exact
        return torch.bfloat16

    def seed_everything(self, seed: int) -> None:
        super().seed_everything(seed)
        _xm().set_rng_state(seed)  # XLA keeps its own RNG state

    def synchronize(self) -> None:
        import torch_xla

        sync = getattr(torch_xla, "sync", None)  # torch_xla >= 2.6; mark_step before (deprecated in 2.9)
        sync() if sync is not None else _xm().mark_step()
        _xm().wait_device_ops()

    def empty_cache(self) -> None:
        pass  # XLA owns its buffers

    def _memory_info(self) -> dict[str, int] | None:
        """{used, limit, peak} bytes on a TPU; None on clients without allocator stats (CPU)."""
        try:
            info = _xm().get_memory_info(self.device())
        except RuntimeError:  # the CPU client: "GetAllocatorStats is not supported"
            return None
        limit = int(info.get("bytes_limit", 0))
        if not limit:
            return None
        used = int(info.get("bytes_used", 0))
        return {"used": used, "limit": limit, "peak": int(info.get("peak_bytes_used", used))}

    def mem_get_info(self) -> tuple[int, int]:
        info = self._memory_info()
        if info is None:  # host RAM stands in for device memory on the CPU client
            vm = psutil.virtual_memory()
            return int(vm.available), int(vm.total)
        return info["limit"] - info["used"], info["limit"]

    def memory_stats(self) -> dict[str, Any]:
        free, total = self.mem_get_info()
        return {"free_bytes": free, "total_bytes": total}

    def memory_allocated(self) -> int:
        free, total = self.mem_get_info()
        return total - free

    memory_reserved = memory_allocated

    def max_memory_allocated(self) -> int:
        info = self._memory_info()
        return info["peak"] if info is not None else self.memory_allocated()

    def reset_peak_memory_stats(self) -> None:
        pass  # XLA reports no resettable peak

    def set_device(self, index: int) -> None:
        pass  # one process per TPU core: PJRT assigns it
