"""XPURunner through the conformance suite with torch.xpu's surface replaced at the platform
boundary: no Intel GPU is here, so the platform keeps tensors on the CPU and answers memory
queries from the OS. This exercises the XPU runner's hooks and everything the base does for it;
XPU kernels, XPU graphs and real device memory are NOT exercised (see the README's device table)."""
from typing import Any

import torch

from engine.config import EngineConfig
from platforms.cpu import CpuPlatform
from platforms.xpu import XpuPlatform
from runners.testing import RunnerConformance
from runners.xpu import XPURunner


class StandInXpuPlatform(XpuPlatform):
    device_type = "cpu"
    pin_memory = False

    def __init__(self) -> None:
        self._host = CpuPlatform()
        self.devices_set: list[int] = []

    @property
    def supports_graphs(self) -> bool:  # type: ignore[override]
        return False

    def device(self, index: int | None = None) -> torch.device:
        return torch.device("cpu")

    def __getattribute__(self, name: str) -> Any:
        if name in ("synchronize", "empty_cache", "mem_get_info", "memory_stats", "memory_allocated",
                    "memory_reserved", "max_memory_allocated", "reset_peak_memory_stats"):
            return getattr(object.__getattribute__(self, "_host"), name)
        return object.__getattribute__(self, name)

    def set_device(self, index: int) -> None:
        self.devices_set.append(index)

    def device_name(self) -> str:
        return "stand-in XPU"

    def multiprocessor_count(self) -> int:
        return 8


class TestXPURunnerStandIn(RunnerConformance):
    runner_cls = XPURunner
    device = "xpu"
    platform = StandInXpuPlatform()
    engine_args = {"attention_backend": "torch"}  # the Triton kernel in a runner: test_cpu_triton_conformance
    kv_in_host_memory = False  # it stands in for an XPU: its KV cache would be in device memory


def test_xpu_runner_reads_device_facts_from_the_platform():
    r = XPURunner(EngineConfig(device="xpu", num_kv_blocks=8, max_num_seqs=4, max_model_len=64),
                  StandInXpuPlatform())
    assert r.plan.decode_graph_sizes == () and not r.plan.has_graphs, "no graphs where the platform has none"
    assert r.attn_backend.name in ("triton", "torch")
