"""The CPU runner with the composite backend: mixed steps split between Triton (interpreter) for
decode rows and the torch reference for prefill rows (no table entry on the CPU: every row to the
kernel of its role), through prefill, decode, mixed, chunked, prefix-cache and preemption steps."""
import pytest

from runners.cpu import CPURunner
from runners.testing import RunnerConformance

pytest.importorskip("triton")
from tests.attention.composite_backends import TritonTorchComposite  # noqa: E402 (registers it)


class TestCPURunnerComposite(RunnerConformance):
    runner_cls = CPURunner
    device = "cpu"
    engine_args = {"attention_backend": TritonTorchComposite.name}
