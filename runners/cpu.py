"""CPURunner: eager execution; the KV cache takes a bounded share of free RAM."""
from __future__ import annotations

import torch

from runners.base import ModelRunnerBase

CPU_KV_CACHE_CAP = 4 * 2**30  # like vLLM's default CPU KV space; kv_cache_memory_bytes overrides


class CPURunner(ModelRunnerBase):
    def _cache_device_properties(self) -> None:
        self.num_threads = torch.get_num_threads()

    def load_model(self) -> None:
        before = self.platform.memory_allocated()
        self.model = self._build_model()
        self.model_memory_bytes = max(self.platform.memory_allocated() - before, 0)

    def profile_run(self) -> int:
        self.platform.reset_peak_memory_stats()
        base = self.platform.memory_allocated()
        self._dummy_run(self.max_num_tokens, sample=True)
        self.peak_activation_bytes = max(self.platform.max_memory_allocated() - base, 0)
        free, _ = self.platform.mem_get_info()
        budget = min(CPU_KV_CACHE_CAP, max(free - self.peak_activation_bytes, 0) // 2)
        useful = self.max_num_reqs * self.max_blocks_per_req + 1  # more could never be used
        return self._num_kv_blocks_for(budget, "min(4 GiB, half of free RAM)", max_useful=useful)

    def capture_model(self) -> None:
        pass  # eager on the CPU
