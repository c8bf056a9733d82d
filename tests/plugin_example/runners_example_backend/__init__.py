"""An example device backend living outside the model-runners tree."""
from __future__ import annotations

import os


def register() -> str | None:
    """Entry point of the ``runners.platforms`` group: the platform class path when the device is
    present, else None (this stand-in device is "present" unless RUNNERS_EXAMPLE_DEVICE=0)."""
    if os.environ.get("RUNNERS_EXAMPLE_DEVICE", "1") == "0":
        return None
    return "runners_example_backend.platform:ExamplePlatform"
