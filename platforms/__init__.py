"""Platform resolution: env override, then entry-point plugins, then detection.

``platforms.current_platform`` resolves on first access (importing this package touches
no device) and is cached; ``resolve_platform(name)`` builds one explicitly.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from importlib.metadata import EntryPoint, entry_points

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

__all__ = ["Platform", "AcceleratorPlatform", "PluginError", "resolve_platform", "load_platform_cls",
           "parse_device", "known_platforms", "current_platform", "ENV_VAR", "PLUGIN_GROUP"]


def load_platform_cls(path: str) -> type[Platform]:
    """``"pkg.module:Class"`` (or ``"pkg.module.Class"``) -> the class."""
    module, sep, name = path.partition(":")
    if not sep:
        module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    if not (isinstance(cls, type) and issubclass(cls, Platform)):
        raise TypeError(f"{path} is not a Platform subclass")
    return cls


class PluginError(RuntimeError):
    """A platform plugin failed (its ``register()`` raised, or it named a class that cannot be
    loaded); the message names the plugin and its entry point."""


def _plugins() -> dict[str, EntryPoint]:
    """Installed plugins: entry point name -> entry point (whose ``register`` returns a class path or None)."""
    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP)}


def known_platforms() -> list[str]:
    return sorted(set(BUILTIN) | set(_plugins()))


def _describe(ep: EntryPoint) -> str:
    dist = getattr(getattr(ep, "dist", None), "name", None)
    where = f"entry point '{ep.name} = {getattr(ep, 'value', '?')}' in group {PLUGIN_GROUP!r}"
    return f"platform plugin {ep.name!r} ({where}{f' of package {dist!r}' if dist else ''})"


def _plugin_cls(ep: EntryPoint) -> type[Platform] | None:
    """The plugin's platform class, or None if it reports that it cannot run here."""
    try:
        path = ep.load()()
    except Exception as e:  # noqa: BLE001 - any failure inside a plugin is reported as the plugin's
        raise PluginError(f"{_describe(ep)} failed in register(): {type(e).__name__}: {e}") from e
    if path is None:
        return None
    if not isinstance(path, str):
        raise PluginError(f"{_describe(ep)}: register() returned {path!r}; expected a class path "
                          f"'module:Class' or None")
    try:
        return load_platform_cls(path)
    except Exception as e:  # noqa: BLE001
        raise PluginError(f"{_describe(ep)}: its platform class {path!r} cannot be loaded: "
                          f"{type(e).__name__}: {e}") from e


def parse_device(name: str) -> tuple[str, int | None]:
    """``"cuda:1"`` -> ``("cuda", 1)`` with aliases resolved (``"gpu"``, ``"xla"``); ValueError
    for a string that is not ``<platform>`` or ``<platform>:<index>``."""
    key, sep, index = name.strip().partition(":")
    key = key.lower()
    key = _ALIASES.get(key, key)
    if not key or (sep and not index.isdigit()):
        raise ValueError(f"device={name!r} is not of the form '<platform>' or '<platform>:<index>' "
                         f"(a non-negative integer index), e.g. 'cpu' or 'cuda:0'")
    return key, int(index) if sep else None


def _detect_plugins(plugins: dict[str, EntryPoint]) -> dict[str, type[Platform]]:
    """Plugins whose device is present. A failing plugin is skipped with a warning naming it, so
    it cannot break detection of the other platforms."""
    active = {}
    for name, ep in plugins.items():
        try:
            cls = _plugin_cls(ep)
            if cls is None or not cls.is_available():
                continue
        except Exception as e:  # noqa: BLE001 - is_available() is plugin code too
            msg = str(e) if isinstance(e, PluginError) else f"{_describe(ep)}: is_available() raised " \
                                                              f"{type(e).__name__}: {e}"
            warnings.warn(f"{msg}; skipped during platform detection", RuntimeWarning, stacklevel=3)
            continue
        active[name] = cls
    return active


def resolve_platform(name: str | None = None) -> Platform:
    """The platform named (a device string such as "cuda:0" works too), else the env var
    RUNNERS_PLATFORM, else the one active plugin, else the first detected device.

    A named platform that cannot run here is a RuntimeError that says why and what to do; a
    failing plugin is a ``PluginError`` when named and a warning (skipped) during detection.
    """
    setting = f"device={name!r}" if name else f"{ENV_VAR}={os.environ.get(ENV_VAR)!r}"
    name = name or os.environ.get(ENV_VAR) or None
    plugins = _plugins()
    if name:
        key, index = parse_device(name)
        if key in plugins:
            cls = _plugin_cls(plugins[key])
            if cls is None:
                raise RuntimeError(f"platform plugin {key!r} reports that it cannot run here "
                                   f"({_describe(plugins[key])}, {setting})")
            return cls()
        if key == "cuda" and _torch_hip():
            key = "rocm"
        if key not in BUILTIN:
            raise ValueError(f"unknown platform {name!r}; known: {known_platforms()}")
        cls = load_platform_cls(BUILTIN[key])
        reason = cls.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"{setting} asks for the {key} platform, but {reason}. Use device='cpu', "
                               f"or leave device unset (and {ENV_VAR} unset) to use the detected platform")
        if index is not None:
            try:
                cls.check_device_index(index)
            except ValueError as e:
                raise ValueError(f"{setting}: {e}") from None
        return cls()
    active = _detect_plugins(plugins)
    if len(active) > 1:
        raise RuntimeError(f"several platform plugins are active ({sorted(active)}); "
                           f"choose one with {ENV_VAR}")
    if active:
        return next(iter(active.values()))()
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
