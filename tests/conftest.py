import os

import torch

os.environ.setdefault("RUNNERS_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "runners"))
# Without an accelerator, Triton kernels run in its interpreter (must be set before triton imports).
if not torch.accelerator.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
