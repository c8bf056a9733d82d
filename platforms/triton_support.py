"""What Triton's compiled kernels can use on a device: the NVIDIA compute capability, and the
Hopper (sm90+) features the attention and model kernels take where present - tensor
descriptors (TMA) and programmatic dependent launch (PDL). Importable without triton."""
from __future__ import annotations

import functools
import os

import torch

PDL_ENV_VAR = "RUNNERS_PDL"


@functools.lru_cache(maxsize=None)
def compute_capability() -> int | None:
    """The current NVIDIA device's compute capability as 90, 100, ... (None if unknown, not
    NVIDIA, or triton is missing)."""
    try:
        from triton.runtime import driver
        target = driver.active.get_current_target()
    except Exception:
        return None
    return int(target.arch) if target.backend == "cuda" else None


def interpreting() -> bool:
    """Triton kernels run in its interpreter (``TRITON_INTERPRET=1``): no device features."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def hopper_or_newer(device: torch.device) -> bool:
    """CUDA from Hopper (sm90) on, with compiled kernels."""
    return device.type == "cuda" and not interpreting() and (compute_capability() or 0) >= 90


def launch_pdl(device: torch.device) -> bool:
    """Whether kernels that support it (the batch-1 GEMVs) launch with programmatic dependent
    launch: on Hopper or newer unless env ``RUNNERS_PDL=0``. Such a kernel may start while the
    previous one finishes; it waits for it (``gdc_wait``) before reading that one's output or
    writing anything. (The step's other Triton kernels gained nothing measurable from it on an
    H200 and launch as before.)"""
    return hopper_or_newer(device) and os.environ.get(PDL_ENV_VAR, "1") != "0"
