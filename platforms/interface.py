"""The Platform contract: the device operations the device-agnostic code needs."""
from __future__ import annotations

import random
from typing import Any, ClassVar

import numpy as np
import torch


class Platform:
    """Device ops and capability flags for one kind of device.

    Shared code calls these instead of the torch device modules. Accelerators get
    their ops through ``torch.accelerator`` where the installed torch has the call,
    else through the device module (``torch.<device_type>``).
    """

    name: ClassVar[str]  # registry name: "cpu", "cuda", "rocm", "xpu", "tpu"
    device_type: ClassVar[str]  # torch device type: "cpu", "cuda", "xpu", "xla"
    runner_cls: ClassVar[str]  # "module:Class" of the model runner for this device
    attention_backends: ClassVar[tuple[str, ...]] = ("torch",)  # default preference order
    supports_graphs: ClassVar[bool] = False
    static_shapes: ClassVar[bool] = False  # pad token/request counts to buckets (graphs, XLA)
    pin_memory: ClassVar[bool] = False  # stage host->device copies in pinned memory
    # What dtype="auto" gives a float32 checkpoint (or one that names no dtype). Conservative by
    # default: a platform that computes faster in half precision opts in (CUDA, XPU).
    auto_float32_dtype: ClassVar[str] = "float32"

    @classmethod
    def is_available(cls) -> bool:
        """True if this platform's device is present (used by auto-detection)."""
        return False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this platform cannot run here when asked for by name (None: it can). Looser than
        ``is_available``, which auto-detection uses: e.g. torch_xla's CPU client is usable by
        name but never detected. Touches no device."""
        return None

    @classmethod
    def check_device_index(cls, index: int) -> None:
        """ValueError if ``<name>:<index>`` names no device of this platform."""

    def device(self, index: int | None = None) -> torch.device:
        return torch.device(self.device_type if index is None else f"{self.device_type}:{index}")

    def resolve_dtype(self, requested: str, config_dtype: str | None) -> torch.dtype:
        """``requested`` is an engine ``dtype``; "auto" takes the checkpoint's half dtype, and
        ``auto_float32_dtype`` for a float32 checkpoint (or one that names none)."""
        if requested != "auto":
            return getattr(torch, requested)
        if config_dtype in ("bfloat16", "float16"):
            return getattr(torch, config_dtype)
        return getattr(torch, self.auto_float32_dtype)

    def seed_everything(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)  # also seeds every accelerator's default generator

    # Memory and synchronisation ------------------------------------------------------
    def synchronize(self) -> None:
        raise NotImplementedError

    def empty_cache(self) -> None:
        raise NotImplementedError

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        raise NotImplementedError

    def memory_stats(self) -> dict[str, Any]:
        raise NotImplementedError

    def memory_allocated(self) -> int:
        """Bytes held by live tensors now."""
        raise NotImplementedError

    def memory_reserved(self) -> int:
        """Bytes the framework's allocator holds from the device (>= allocated)."""
        raise NotImplementedError

    def max_memory_allocated(self) -> int:
        """Peak of ``memory_allocated`` since the last ``reset_peak_memory_stats``."""
        raise NotImplementedError

    def reset_peak_memory_stats(self) -> None:
        raise NotImplementedError

    def set_device(self, index: int) -> None:
        raise NotImplementedError

    # Tensor parallelism ----------------------------------------------------------------
    def dist_backend(self) -> str:
        """The ``torch.distributed`` backend for collectives between ranks on this device."""
        return "gloo"

    def small_all_reduce(self, group: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """A faster all-reduce for small tensors (``distributed.SmallAllReduce``), or None to
        use ``dist_backend``'s all-reduce for every size."""
        return None

    # Graphs (where ``supports_graphs``) -----------------------------------------------
    def graph_pool_handle(self) -> Any:
        raise NotImplementedError(f"{self.name} has no graph capture")

    def new_graph(self) -> Any:
        raise NotImplementedError(f"{self.name} has no graph capture")

    def graph_capture(self, graph: Any, pool: Any) -> Any:
        """Context manager capturing the work issued inside it into ``graph``."""
        raise NotImplementedError(f"{self.name} has no graph capture")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device_type={self.device_type!r})"


class AcceleratorPlatform(Platform):
    """Ops of a torch accelerator (CUDA, ROCm, XPU): ``torch.accelerator`` first."""

    pin_memory: ClassVar[bool] = True

    def _call(self, name: str, module_name: str | None = None, *args: Any) -> Any:
        acc = getattr(torch, "accelerator", None)
        fn = getattr(acc, name, None) if acc is not None else None
        if fn is None:
            fn = getattr(getattr(torch, self.device_type), module_name or name)
        return fn(*args)

    def synchronize(self) -> None:
        self._call("synchronize")

    def empty_cache(self) -> None:
        self._call("empty_cache")

    def mem_get_info(self) -> tuple[int, int]:
        free, total = self._call("get_memory_info", "mem_get_info")
        return int(free), int(total)

    def memory_stats(self) -> dict[str, Any]:
        return dict(self._call("memory_stats"))

    def memory_allocated(self) -> int:
        return int(self._call("memory_allocated"))

    def memory_reserved(self) -> int:
        return int(self._call("memory_reserved"))

    def max_memory_allocated(self) -> int:
        return int(self._call("max_memory_allocated"))

    def reset_peak_memory_stats(self) -> None:
        self._call("reset_peak_memory_stats")

    def set_device(self, index: int) -> None:
        self._call("set_device_index", "set_device", index)
