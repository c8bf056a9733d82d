from __future__ import annotations

from runners import DevicePlan, ModelRunnerBase


class ExampleRunner(ModelRunnerBase):
    """The four hooks; everything else (batching, chunked prefill, prefix caching, sampling) is the base's."""

    def _cache_device_properties(self) -> DevicePlan:
        return self.default_plan()  # the platform's flags decide (this one has no graphs)

    def load_model(self) -> None:
        self.model = self._build_model()

    def profile_run(self) -> int:
        self._dummy_run(self.max_num_tokens, sample=True)
        free, _ = self.platform.mem_get_info()  # the device's memory (here the host's), after the dummy step
        budget = min(free // 4, 256 * self.kv_cache_spec.bytes_per_block)
        return self._num_kv_blocks_for(budget, "a quarter of free device memory, at most 256 blocks")

    def capture_model(self) -> None:
        pass
