"""The CPU runner with the Triton backend (under the interpreter): the kernel inside the full runner."""
import pytest

from runners.cpu import CPURunner
from runners.testing import RunnerConformance

pytest.importorskip("triton")


class TestCPURunnerTriton(RunnerConformance):
    runner_cls = CPURunner
    device = "cpu"
    engine_args = {"attention_backend": "triton"}
