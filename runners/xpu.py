"""XPURunner (Intel GPUs): everything is AcceleratorRunner's; the XPU platform supplies the
device ops and says whether the installed torch has XPU graphs (else steps run eagerly)."""
from __future__ import annotations

from runners.accelerator import AcceleratorRunner


class XPURunner(AcceleratorRunner):
    pass
