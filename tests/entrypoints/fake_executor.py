"""``LLM`` over a fake executor: the engine path (scheduler, LLM loop, detokenizer) at full
speed, with tests/engine/fake_runner.py's FakeRunner as the runner (it simulates the paged KV
cache and reads back every position, so a stale prefix-cache entry fails)."""
from __future__ import annotations

from typing import Callable
from unittest import mock

from engine.config import EngineConfig
from engine.executor import Executor, WorkerInfo
from engine.outputs import ModelRunnerOutput, SchedulerOutput
from entrypoints.llm import LLM
from tests.engine.fake_runner import FakeRunner, check_kv

Hook = Callable[[str, int, SchedulerOutput], None]  # (when: "before" | "after", call number, step)


class FakeExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.fake: FakeRunner | None = None
        self.hook: Hook | None = None
        self.calls = 0

    def initialize(self) -> WorkerInfo:
        return WorkerInfo(num_kv_blocks=self.config.num_kv_blocks, max_model_len=self.config.max_model_len,
                          device="cpu", platform="fake", runner="FakeRunner", attention_backend="none",
                          dtype="float32", tensor_parallel_size=1, num_graphs=0)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        self.calls += 1
        if self.hook is not None:
            self.hook("before", self.calls, scheduler_output)
        out = self.fake.execute(scheduler_output)
        if self.hook is not None:
            self.hook("after", self.calls, scheduler_output)
        return out

    def shutdown(self) -> None:
        pass


def fake_llm(runner_seed: int = 0, **engine: object) -> LLM:
    """An LLM (the default model's config and tokenizer) whose executor is a FakeExecutor.
    ``engine`` must give num_kv_blocks and max_model_len."""
    with mock.patch("workers.get_executor_cls", lambda backend: FakeExecutor):
        llm = LLM(**engine)
    llm.executor.fake = FakeRunner(llm.scheduler, seed=runner_seed, at_least_once=True)
    return llm


def assert_whole(llm: LLM) -> None:
    """No request left anywhere: scheduler, pool (whole, refcounts consistent) and runner."""
    s, fake = llm.scheduler, llm.executor.fake
    check_kv(s.kv)
    assert not s.has_unfinished_requests() and not s.waiting and not s.running
    assert s.kv.num_free_blocks == s.kv.num_blocks - 1, "KV blocks leaked"
    assert not fake.state, f"the runner still holds {sorted(fake.state)}"
