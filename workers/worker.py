"""``Worker``: one tensor-parallel rank. Owns the device, the process group and the runner.

Lifecycle (an executor calls these in order, on every rank at once)::

    init_device -> load_model -> determine_num_kv_blocks -> initialize_cache(n)
    -> compile_or_warm_up -> execute_model(...)* -> shutdown

The runner (``runners.get_runner_cls``) stays ignorant of processes: the worker hands it
its device and ``TPGroup``; collectives outside the model (the KV-size minimum) are here.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import os

import torch

from distributed import TPGroup
from engine.config import EngineConfig
from engine.executor import StepHandle, WorkerInfo
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from platforms import Platform, resolve_platform
from runners import ModelRunnerBase, get_runner_cls

DIST_TIMEOUT = datetime.timedelta(minutes=10)


class Worker:
    """Rank ``rank`` of ``world_size``; ``local_rank`` picks the device on this host (the
    device index in ``config.device``, if any, is added to it). ``init_method`` is a
    torch.distributed URL ("env://" under torchrun); unused for one rank."""

    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1, local_rank: int | None = None,
                 init_method: str | None = None) -> None:
        if world_size != config.tensor_parallel_size:
            raise ValueError(f"world_size={world_size} but tensor_parallel_size={config.tensor_parallel_size}")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.local_rank = rank if local_rank is None else local_rank
        self.init_method = init_method
        self.platform: Platform | None = None
        self.runner: ModelRunnerBase | None = None
        self._dist = False

    def init_device(self) -> None:
        """Bind the device, seed, join the process group (the platform's backend) and build the runner."""
        platform = resolve_platform(self.config.device)
        config = self.config
        if platform.device_type != "cpu" and (self.world_size > 1 or (config.device and ":" in config.device)):
            base = int(config.device.split(":")[1]) if config.device and ":" in config.device else 0
            index = base + self.local_rank
            platform.set_device(index)
            config = dataclasses.replace(config, device=f"{platform.name}:{index}")
        if platform.device_type == "cpu" and self.world_size > 1:  # ranks share the host's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world_size))
        platform.seed_everything(config.seed)
        tp = TPGroup.single()
        if self.world_size > 1:
            device_id = platform.device(index) if platform.device_type != "cpu" else None
            kwargs = {"device_id": device_id} if device_id is not None else {}
            torch.distributed.init_process_group(platform.dist_backend(), init_method=self.init_method,
                                                 rank=self.rank, world_size=self.world_size,
                                                 timeout=DIST_TIMEOUT, **kwargs)
            self._dist = True
            tp = TPGroup(self.rank, self.world_size)
        self.platform = platform
        self.runner = get_runner_cls(config.device)(config, platform, tp=tp)
        if self.world_size > 1:
            tp.small_all_reduce = platform.small_all_reduce(None, self.runner.device, self.runner.dtype)

    def load_model(self) -> None:
        self.runner.load_model()

    def determine_num_kv_blocks(self) -> int:
        """The runner's ``profile_run``; across ranks the minimum, so every rank's pool is alike."""
        n = self.runner.profile_run()
        if self.world_size > 1:
            t = torch.tensor([n], dtype=torch.int64,
                             device=self.runner.device if self.platform.dist_backend() != "gloo" else "cpu")
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            n = int(t.item())
        return n

    def initialize_cache(self, num_blocks: int) -> None:
        self.runner.initialize_kv_cache(num_blocks)

    def compile_or_warm_up(self) -> None:
        if not self.config.enforce_eager:
            self.runner.capture_model()

    def info(self) -> WorkerInfo:
        r = self.runner
        profile = getattr(r, "memory_profile", None)
        return WorkerInfo(num_kv_blocks=r.num_kv_blocks, max_model_len=r.max_model_len, device=str(r.device),
                          platform=r.platform.name, runner=type(r).__name__, attention_backend=r.attn_backend.name,
                          dtype=str(r.dtype).removeprefix("torch."), tensor_parallel_size=self.world_size,
                          kv_cache_dtype=str(r.kv_cache_spec.dtype).removeprefix("torch."),
                          num_graphs=r.graphs.num_graphs, plan=r.plan.describe(), memory=profile.describe() if profile is not None else None,
                          all_reduce=r.tp.describe_all_reduce(self.platform.dist_backend()) if r.tp.size > 1 else None)

    def initialize(self) -> WorkerInfo:
        """Every step after ``init_device``, in order (the executors' common sequence)."""
        self.load_model()
        self.initialize_cache(self.determine_num_kv_blocks())
        self.compile_or_warm_up()
        return self.info()

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute_model(scheduler_output)

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        return self.runner.execute_model_async(scheduler_output)

    def steps_launched_ahead(self) -> int:
        """How many steps the runner launched before the previous step's ids were read back."""
        return self.runner.steps_launched_ahead

    def shutdown(self) -> None:
        """Leave the process group and free the runner's device memory (idempotent)."""
        if self._dist and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self._dist = False
        if self.runner is not None:
            self.runner = None  # the model, the KV cache and the graphs go with it
            gc.collect()
            self.platform.empty_cache()
