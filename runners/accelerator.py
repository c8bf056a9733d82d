"""AcceleratorRunner: the hooks GPU and XPU runners share, written against platform ops only."""
from __future__ import annotations

from runners.base import ModelRunnerBase
from runners.graphs import capture_decode_graphs
from runners.memory import measure_allocation, profile_memory


class AcceleratorRunner(ModelRunnerBase):
    """Weights measured and the KV cache sized with the platform's memory ops; decode steps
    captured as graphs where ``_cache_device_properties`` planned ``graph_sizes``.
    Subclasses implement ``_cache_device_properties`` only."""

    def load_model(self) -> None:
        self.model, self.weights_bytes = measure_allocation(self.platform, self._build_model)

    def profile_run(self) -> int:
        self.memory_profile = profile_memory(
            self.platform, lambda: self._dummy_run(self.max_num_tokens, sample=True),
            self.weights_bytes, self.config.gpu_memory_utilization)
        return self._num_kv_blocks_for(self.memory_profile.kv_budget, self.memory_profile.describe())

    def capture_model(self) -> None:
        if getattr(self, "graph_sizes", None):
            capture_decode_graphs(self, self.graph_sizes)
