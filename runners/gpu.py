"""GPURunner (CUDA and ROCm): everything is AcceleratorRunner's; the CUDA platform supplies
the device ops, graphs and the default plan's capability flags."""
from __future__ import annotations

from runners.accelerator import AcceleratorRunner


class GPURunner(AcceleratorRunner):
    pass
