"""In-process executors: ``UniProcExecutor`` runs one rank in this process (no extra process,
no process group); ``InProcessExecutor`` is what it shares with the torchrun executor."""
from __future__ import annotations

from engine.config import EngineConfig
from engine.executor import Executor, StepHandle, WorkerInfo
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from runners import ModelRunnerBase
from workers.worker import Worker


class InProcessExecutor(Executor):
    """This process's one ``Worker`` (set and device-initialised by the subclass)."""

    worker: Worker

    @property
    def runner(self) -> ModelRunnerBase:
        """The runner, in this process (tests and benchmarks reach into it)."""
        return self.worker.runner

    def initialize(self) -> WorkerInfo:
        return self.worker.initialize()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return self.worker.execute_model_async(scheduler_output)

    def shutdown(self) -> None:
        self.worker.shutdown()


class UniProcExecutor(InProcessExecutor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        if config.tensor_parallel_size != 1:
            raise ValueError("UniProcExecutor runs one rank; tensor_parallel_size must be 1")
        self.worker = Worker(config)
        self.worker.init_device()
