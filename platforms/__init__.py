"""Platform resolution: env override, then entry-point plugins, then detection.

``platforms.current_platform`` resolves on first access (importing this package touches
no device) and is cached; ``resolve_platform(name)`` builds one explicitly.
"""
from __future__ import annotations

import functools
import importlib
import os
from importlib.metadata import entry_points
from typing import Callable

from platforms.interface import AcceleratorPlatform, Platform

ENV_VAR = "RUNNERS_PLATFORM"
PLUGIN_GROUP = "runners.platforms"
BUILTIN: dict[str, str] = {
    "cuda": "platforms.cuda:CudaPlatform",
    "rocm": "platforms.cuda:RocmPlatform",
    "xpu": "platforms.xpu:XpuPlatform",
    "tpu": "platforms.tpu:TpuPlatform",
    "cpu": "platforms.cpu:CpuPlatform",
}
DETECTION_ORDER = ("cuda", "rocm", "xpu", "tpu", "cpu")
_ALIASES = {"xla": "tpu", "gpu": "cuda"}

__all__ = ["Platform", "AcceleratorPlatform", "resolve_platform", "load_platform_cls",
           "known_platforms", "current_platform", "ENV_VAR", "PLUGIN_GROUP"]


def load_platform_cls(path: str) -> type[Platform]:
    """``"pkg.module:Class"`` (or ``"pkg.module.Class"``) -> the class."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise TypeError(f"{path} is not a Platform subclass")
    return cls


def _plugins() -> dict[str, Callable[[], str | None]]:
    """Installed plugins: entry point name -> function returning a class path or None."""
    return {ep.name: ep.load for ep in entry_points(group=PLUGIN_GROUP)}


def known_platforms() -> list[str]:
    return sorted(set(BUILTIN) | set(_plugins()))


def _from_plugin(name: str, loader: Callable[[], str | None]) -> str | None:
    path = loader()()
    if path is not None and not isinstance(path, str):
        raise TypeError(f"platform plugin {name!r} returned {path!r}; expected a class path or None")
    return path


def resolve_platform(name: str | None = None) -> Platform:
    """The platform named (a device string such as "cuda:0" works too), else the env var
    RUNNERS_PLATFORM, else the one active plugin, else the first detected device."""
    name = name or os.environ.get(ENV_VAR) or None
    plugins = _plugins()
    if name:
        key = name.split(":")[0].lower()
        key = _ALIASES.get(key, key)
        if key in plugins:
            path = _from_plugin(key, plugins[key])
            if path is None:
                raise RuntimeError(f"platform plugin {key!r} reports that it cannot run here")
            return load_platform_cls(path)()
        if key == "cuda" and _torch_hip():
            key = "rocm"
        if key not in BUILTIN:
            raise ValueError(f"unknown platform {name!r}; known: {known_platforms()}")
        return load_platform_cls(BUILTIN[key])()
    active = {n: p for n, f in plugins.items() if (p := _from_plugin(n, f)) is not None}
    if len(active) > 1:
        raise RuntimeError(f"several platform plugins are active ({sorted(active)}); "
                           f"choose one with {ENV_VAR}")
    if active:
        return load_platform_cls(next(iter(active.values())))()
    for key in DETECTION_ORDER:
        cls = load_platform_cls(BUILTIN[key])
        if cls.is_available():
            return cls()
    raise RuntimeError("no platform detected")  # unreachable: the CPU is always available


def _torch_hip() -> bool:
    import torch

    return torch.version.hip is not None


@functools.cache
def _current() -> Platform:
    return resolve_platform()


def __getattr__(name: str) -> Platform:
    if name == "current_platform":
        return _current()
    raise AttributeError(f"module 'platforms' has no attribute {name!r}")
