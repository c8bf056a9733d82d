"""Intel GPUs through torch.xpu."""
from __future__ import annotations

from typing import Any, ClassVar

import torch

from platforms.interface import AcceleratorPlatform


class XpuPlatform(AcceleratorPlatform):
    name: ClassVar[str] = "xpu"
    device_type: ClassVar[str] = "xpu"
    runner_cls: ClassVar[str] = "runners.xpu:XPURunner"
    attention_backends: ClassVar[tuple[str, ...]] = ("triton", "torch")
    auto_float32_dtype: ClassVar[str] = "bfloat16"  # a float32 checkpoint runs in bf16 on XPUs

    @classmethod
    def is_available(cls) -> bool:
        xpu = getattr(torch, "xpu", None)
        return xpu is not None and xpu.is_available()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if cls.is_available():
            return None
        return (f"this torch ({torch.__version__}) sees no Intel XPU (install torch's XPU build and "
                f"Intel's GPU driver)")

    @classmethod
    def check_device_index(cls, index: int) -> None:
        n = torch.xpu.device_count()
        if index >= n:
            raise ValueError(f"there are {n} XPU(s) here (indices 0..{n - 1}), no index {index}")

    def dist_backend(self) -> str:
        return "xccl" if getattr(torch.distributed, "is_xccl_available", lambda: False)() else "ccl"

    @property
    def supports_graphs(self) -> bool:  # type: ignore[override]
        return hasattr(torch.xpu, "XPUGraph")  # XPU graphs only where the installed torch has them

    def graph_pool_handle(self) -> Any:
        return torch.xpu.graph_pool_handle()

    def new_graph(self) -> Any:
        return torch.xpu.XPUGraph()

    def graph_capture(self, graph: Any, pool: Any) -> Any:
        return torch.xpu.graph(graph, pool=pool)

    def device_name(self) -> str:
        return torch.xpu.get_device_name()

    def multiprocessor_count(self) -> int:
        return int(getattr(torch.xpu.get_device_properties(), "gpu_subslice_count", 0) or 0)
