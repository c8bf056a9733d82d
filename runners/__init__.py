"""Model runners: ModelRunnerBase and one small subclass per device."""
from __future__ import annotations

import importlib

from runners.base import ModelRunnerBase
from runners.plan import DevicePlan
from platforms import resolve_platform

__all__ = ["DevicePlan", "ModelRunnerBase", "get_runner_cls"]


def get_runner_cls(device: str | None = None) -> type[ModelRunnerBase]:
    """The runner class of the named device's platform (or of the current platform)."""
    path = resolve_platform(device).runner_cls
    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if not issubclass(cls, ModelRunnerBase):
        raise TypeError(f"{path} is not a ModelRunnerBase subclass")
    return cls
