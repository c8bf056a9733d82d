"""GPURunner (CUDA and ROCm): measured weights, profiled KV sizing, decode CUDA graphs."""
from __future__ import annotations

import torch

from runners.base import ModelRunnerBase
from runners.graphs import capture_decode_graphs, default_graph_sizes
from runners.memory import measure_allocation, profile_memory


class GPURunner(ModelRunnerBase):
    def _cache_device_properties(self) -> None:
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.platform.set_device(index)
        props = torch.cuda.get_device_properties(index)
        self.device_name = props.name
        self.num_sms = props.multi_processor_count
        self.capability = (props.major, props.minor)
        self.graph_sizes: list[int] = []
        if not self.config.enforce_eager and getattr(self.attn_backend, "supports_graphs", False):
            limit = min(self.max_num_reqs, self.max_num_tokens)
            self.graph_sizes = sorted(s for s in (self.config.cuda_graph_sizes or default_graph_sizes(limit))
                                      if s <= limit)
            self.decode_buckets = self.graph_sizes or None

    def load_model(self) -> None:
        self.model, self.weights_bytes = measure_allocation(self.platform, self._build_model)

    def profile_run(self) -> int:
        self.memory_profile = profile_memory(
            self.platform, lambda: self._dummy_run(self.max_num_tokens, sample=True),
            self.weights_bytes, self.config.gpu_memory_utilization)
        return self._num_kv_blocks_for(self.memory_profile.kv_budget, self.memory_profile.describe())

    def capture_model(self) -> None:
        if self.graph_sizes:
            capture_decode_graphs(self, self.graph_sizes)
