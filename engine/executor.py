"""The executor interface: how the engine reaches the workers that run the model (torch-free).

An executor owns one engine's workers (one per tensor-parallel rank). Implementations live
below the engine, in ``workers``: ``UniProcExecutor`` (this process), ``MultiprocExecutor``
(one spawned process per rank) and ``ExternalLauncherExecutor`` (torchrun started every rank).
The engine only sees this contract:

- ``__init__(config)`` starts the workers (processes, devices, ``torch.distributed``);
- ``initialize()`` loads the model, sizes the KV cache (the minimum over ranks), allocates it
  and warms up (graphs), and returns a ``WorkerInfo``;
- ``execute_model(scheduler_output)`` runs one step on every rank and returns rank 0's
  ``ModelRunnerOutput`` (every rank samples the same tokens);
- ``execute_model_async(scheduler_output)`` launches a step and returns a ``StepHandle``
  at once; ``handle.result()`` gives the output. Handles are resolved in launch order (a
  handle may be dropped unresolved, e.g. after Ctrl-C; later handles still resolve). With
  async scheduling the engine launches step n+1 before it resolves step n, and every rank
  launches step n+1 before it reads step n's ids back. The default runs the step
  synchronously (a handle that is already done); the executors in ``workers`` all overlap;
- ``shutdown()`` stops the workers and leaves no process behind; it is idempotent.

A worker that raises or dies makes the call raise ``WorkerError`` naming the rank; the
executor is then shut down (a collective left half-done cannot be resumed) and later
calls raise at once.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from engine.config import EngineConfig
from engine.outputs import ModelRunnerOutput, SchedulerOutput


class WorkerError(RuntimeError):
    """A worker raised or died; ``rank`` says which (None: not one rank in particular)."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class WorkerInfo:
    """What rank 0 reports after ``initialize``: enough for the engine and a summary line."""

    num_kv_blocks: int
    max_model_len: int
    device: str
    platform: str
    runner: str
    attention_backend: str
    dtype: str
    tensor_parallel_size: int
    num_graphs: int
    plan: str = ""  # the runner's DevicePlan in words (graphs, piecewise, padding)
    memory: str | None = None  # the KV sizing arithmetic, where the runner measured memory
    all_reduce: str | None = None  # how tensor-parallel all-reduces go (None: one rank)
    kv_cache_dtype: str | None = None  # the KV cache's element type (None: not reported)


class StepHandle(ABC):
    """A launched step; ``result()`` waits for it (once; later calls return the same output)."""

    @abstractmethod
    def result(self) -> ModelRunnerOutput: ...


class DoneStep(StepHandle):
    """A step that has already run."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output


class Executor(ABC):
    """One engine's workers; see the module docstring for the contract."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def initialize(self) -> WorkerInfo:
        """Load the model, size the KV cache (minimum over ranks), allocate it, warm up."""

    @abstractmethod
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; rank 0's output."""

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        """Launch one step; its output through the handle (default: run it now)."""
        return DoneStep(self.execute_model(scheduler_output))

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every worker; idempotent."""
