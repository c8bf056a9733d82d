from __future__ import annotations

from typing import ClassVar

from platforms.cpu import CpuPlatform


class ExamplePlatform(CpuPlatform):
    """A stand-in device whose memory is the host's (a real backend wraps its own runtime)."""

    name: ClassVar[str] = "example"
    runner_cls: ClassVar[str] = "runners_example_backend.runner:ExampleRunner"
