"""GPURunner (CUDA and ROCm): device facts from torch.cuda; the rest is AcceleratorRunner's."""
from __future__ import annotations

import torch

from runners.accelerator import AcceleratorRunner
from runners.graphs import plan_decode_graphs


class GPURunner(AcceleratorRunner):
    def _cache_device_properties(self) -> None:
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.platform.set_device(index)
        props = torch.cuda.get_device_properties(index)
        self.device_name = props.name
        self.num_sms = props.multi_processor_count
        self.capability = (props.major, props.minor)
        plan_decode_graphs(self)
