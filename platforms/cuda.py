"""CUDA GPUs, and ROCm GPUs (same torch device type and ops; recognised by torch.version.hip)."""
from __future__ import annotations

import os
import warnings
from typing import Any, ClassVar

import torch

from platforms.symm_mem import OneShotAllReduce
from platforms.interface import AcceleratorPlatform


class CudaPlatform(AcceleratorPlatform):
    name: ClassVar[str] = "cuda"
    device_type: ClassVar[str] = "cuda"
    runner_cls: ClassVar[str] = "runners.gpu:GPURunner"
    attention_backends: ClassVar[tuple[str, ...]] = ("auto", "flash", "triton", "torch")
    supports_graphs: ClassVar[bool] = True
    static_shapes: ClassVar[bool] = False
    auto_float32_dtype: ClassVar[str] = "bfloat16"  # tensor cores: a float32 checkpoint runs in bf16

    @classmethod
    def is_available(cls) -> bool:
        return torch.version.cuda is not None and torch.cuda.is_available()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) was built without CUDA (install a CUDA build of torch)"
        if not torch.cuda.is_available():
            return ("no CUDA GPU is visible (check the driver with nvidia-smi, and CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        return None

    @classmethod
    def check_device_index(cls, index: int) -> None:
        n = torch.cuda.device_count()
        if index >= n:
            raise ValueError(f"there are {n} GPU(s) here (indices 0..{n - 1}), no index {index}")

    def device_capability(self) -> tuple[int, int]:
        return torch.cuda.get_device_capability()

    def device_name(self) -> str:
        return torch.cuda.get_device_name()

    def multiprocessor_count(self) -> int:
        return torch.cuda.get_device_properties().multi_processor_count

    def dist_backend(self) -> str:
        return "nccl"  # RCCL under the same name on ROCm

    def small_all_reduce(self, group: Any, device: torch.device, dtype: torch.dtype) -> Any:
        """The one-shot symmetric-memory all-reduce (``platforms.symm_mem.OneShotAllReduce``) for
        messages up to env ``RUNNERS_SYMM_MEM_MAX_BYTES`` (unset or 0: NCCL for every size). Opt-in
        until it is measured end to end on two GPUs (its kernel is tested on one, and against
        host buffers). Collective: every rank calls it, and all keep NCCL unless every rank
        could set it up."""
        max_bytes = int(os.environ.get("RUNNERS_SYMM_MEM_MAX_BYTES", "0") or 0)
        if max_bytes <= 0 or torch.version.hip is not None or dtype not in OneShotAllReduce.DTYPES:
            return None
        fast, error = None, None
        try:
            fast = OneShotAllReduce.from_group(group, device, dtype, max_bytes)
        except Exception as e:  # noqa: BLE001 - any failure here only costs speed: keep NCCL
            error = e
        ok = torch.tensor([fast is not None], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN, group=group)
        if not ok.item():
            warnings.warn(f"one-shot all-reduce unavailable on {'this' if error else 'another'} rank, "
                          f"using NCCL for all sizes{f': {error}' if error else ''}")
            return None
        return fast

    def graph_pool_handle(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def new_graph(self) -> Any:
        return torch.cuda.CUDAGraph()

    def graph_capture(self, graph: Any, pool: Any) -> Any:
        return torch.cuda.graph(graph, pool=pool)


class RocmPlatform(CudaPlatform):
    name: ClassVar[str] = "rocm"
    attention_backends: ClassVar[tuple[str, ...]] = ("triton", "torch")

    @classmethod
    def is_available(cls) -> bool:
        return torch.version.hip is not None and torch.cuda.is_available()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if torch.version.hip is None:
            return f"this torch ({torch.__version__}) was built without ROCm (install a ROCm build of torch)"
        if not torch.cuda.is_available():
            return ("no ROCm GPU is visible (check the driver with rocm-smi, and HIP_VISIBLE_DEVICES="
                    f"{os.environ.get('HIP_VISIBLE_DEVICES')!r})")
        return None
