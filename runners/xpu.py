"""XPURunner (Intel GPUs): device facts through the platform (torch.xpu); XPU graphs where the
installed torch has them, else eager; the rest is AcceleratorRunner's."""
from __future__ import annotations

from runners.accelerator import AcceleratorRunner
from runners.graphs import plan_decode_graphs


class XPURunner(AcceleratorRunner):
    def _cache_device_properties(self) -> None:
        if self.device.index is not None:
            self.platform.set_device(self.device.index)
        self.device_name = self.platform.device_name()
        self.num_sms = self.platform.multiprocessor_count()
        plan_decode_graphs(self)
