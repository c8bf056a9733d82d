from runners.cpu import CPURunner
from runners.testing import RunnerConformance


class TestCPURunner(RunnerConformance):
    runner_cls = CPURunner
    device = "cpu"
    multimodal = True
