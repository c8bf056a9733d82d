"""``ExternalLauncherExecutor`` (``distributed_executor_backend="external_launcher"``): every rank is
a process that ``torchrun`` started and that builds its own engine. Each runs the same scheduler
on the same inputs, so every rank makes the same decisions and returns the same outputs; only
the model's collectives cross processes. Rank, world size and local rank come from torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""
from __future__ import annotations

import os

from engine.config import EngineConfig
from engine.executor import WorkerError
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
            raise WorkerError(f"rank {self.rank} failed: {type(e).__name__}: {e}", self.rank) from e
