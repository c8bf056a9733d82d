"""``ExternalLauncherExecutor`` (``distributed_executor_backend="external_launcher"``): every rank is
a process that ``torchrun`` started and that builds its own engine. Each runs the same scheduler
on the same inputs, so every rank makes the same decisions and returns the same outputs; only
the model's collectives cross processes. Rank, world size and local rank come from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Async steps are the
runner's own handles (each rank overlaps by itself); a failure is a ``WorkerError`` naming the
rank, at launch or at ``result()``."""
from __future__ import annotations

import os

from engine.config import EngineConfig
from engine.executor import StepHandle, WorkerError
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from workers.uniproc import InProcessExecutor
from workers.worker import Worker


def torchrun_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; ValueError if it is absent."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"distributed_executor_backend='external_launcher' runs under torchrun, but the "
                         f"environment lacks {missing}: start the script with `torchrun --nproc-per-node N`")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


class ExternalLauncherExecutor(InProcessExecutor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        rank, world, local_rank = torchrun_env()
        if world != config.tensor_parallel_size:
            raise ValueError(f"torchrun started {world} processes but tensor_parallel_size="
                             f"{config.tensor_parallel_size}: they must be equal")
        self.rank = rank
        self.worker = Worker(config, rank, world, local_rank, init_method="env://")
        self.worker.init_device()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        try:
            return self.worker.execute_model(scheduler_output)
        except Exception as e:
            raise _failed(self.rank, e) from e

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        try:
            return _RankStep(self.worker.execute_model_async(scheduler_output), self.rank)
        except Exception as e:
            raise _failed(self.rank, e) from e


def _failed(rank: int, e: Exception) -> WorkerError:
    return WorkerError(f"rank {rank} failed: {type(e).__name__}: {e}", rank)


class _RankStep(StepHandle):
    """The runner's handle, with its failures named by rank."""

    def __init__(self, handle: StepHandle, rank: int) -> None:
        self._handle, self._rank = handle, rank

    def result(self) -> ModelRunnerOutput:
        try:
            return self._handle.result()
        except Exception as e:
            raise _failed(self._rank, e) from e
