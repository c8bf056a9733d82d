"""CPURunner: eager execution (or compiled pieces with ``use_piecewise_graph``); the KV cache
takes a bounded share of free RAM."""
from __future__ import annotations

from runners.base import ModelRunnerBase
from runners.plan import DevicePlan

CPU_KV_CACHE_CAP = 4 * 2**30  # like vLLM's default CPU KV space; kv_cache_memory_bytes overrides
WARMUP_TOKENS = 64  # the startup step: the model and the sampler run once, end to end


class CPURunner(ModelRunnerBase):
    def _cache_device_properties(self) -> DevicePlan:
        return self.default_plan()  # no graphs; use_piecewise_graph compiles the pieces

    def load_model(self) -> None:
        self.model = self._build_model()

    def profile_run(self) -> int:
        """KV blocks from RAM: min(4 GiB, half of free RAM), no more than could ever be used.

        The other half of free RAM is the activations' headroom, so no worst-case step is
        measured: a ``max_num_batched_tokens`` forward takes seconds to minutes on a few cores
        (13 s for a 135M model on 2). One short step checks the model and sampler instead.
        """
        self._dummy_run(min(self.max_num_tokens, WARMUP_TOKENS), sample=True)
        free, _ = self.platform.mem_get_info()
        budget = min(CPU_KV_CACHE_CAP, free // 2)
        useful = self.max_num_reqs * self.max_blocks_per_req + 1  # more could never be used
        return self._num_kv_blocks_for(budget, "min(4 GiB, half of free RAM)", max_useful=useful)

    def capture_model(self) -> None:
        pass  # no graphs on the CPU; compiled pieces compile at their first step
