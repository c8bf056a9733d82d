"""AcceleratorRunner: the four hooks of GPU-like devices (CUDA, ROCm, XPU), written against
platform ops only; GPU and XPU runners differ in nothing but what their platform says."""
from __future__ import annotations

from runners.base import ModelRunnerBase
from runners.memory import measure_allocation, profile_memory
from runners.plan import DevicePlan


class AcceleratorRunner(ModelRunnerBase):
    """Binds the device, measures the weights, sizes the KV cache from a worst-case step, and
    captures the graphs the default plan declares (full decode graphs where the platform and
    the attention backend have graphs; piecewise graphs where ``use_piecewise_graph``)."""

    def _cache_device_properties(self) -> DevicePlan:
        if self.device.index is not None:
            self.platform.set_device(self.device.index)
        return self.default_plan()

    def load_model(self) -> None:
        self.model, self.weights_bytes = measure_allocation(self.platform, self._build_model)

    def profile_run(self) -> int:
        self.memory_profile = profile_memory(
            self.platform, lambda: self._dummy_run(self.max_num_tokens, sample=True),
            self.weights_bytes, self.config.gpu_memory_utilization)
        return self._num_kv_blocks_for(self.memory_profile.kv_budget, self.memory_profile.describe())

    def capture_model(self) -> None:
        self._capture_graphs()
