"""Workers and executors: between the engine (which schedules) and the runners (which compute).

``Worker`` is one tensor-parallel rank; an ``engine.executor.Executor`` owns an engine's
workers. ``get_executor_cls(backend)`` maps ``distributed_executor_backend`` to one, lazily
(the multiprocess executor's module imports no torch into the engine's process).
"""
from __future__ import annotations

import importlib

from engine.config import EXECUTOR_BACKENDS
from engine.executor import Executor

EXECUTORS: dict[str, str] = {
    "uni": "workers.uniproc:UniProcExecutor",
    "mp": "workers.multiproc:MultiprocExecutor",
    "external_launcher": "workers.external:ExternalLauncherExecutor",
}
assert set(EXECUTORS) == set(EXECUTOR_BACKENDS)

__all__ = ["EXECUTORS", "get_executor_cls"]


def get_executor_cls(backend: str) -> type[Executor]:
    """The executor class for a ``distributed_executor_backend`` name."""
    if backend not in EXECUTORS:
        raise ValueError(f"unknown distributed_executor_backend {backend!r}; known: {sorted(EXECUTORS)}")
    module, _, name = EXECUTORS[backend].partition(":")
    return getattr(importlib.import_module(module), name)
