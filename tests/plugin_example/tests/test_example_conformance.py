"""The whole conformance suite for an out-of-tree runner: a few lines."""
from runners.testing import RunnerConformance
from runners_example_backend.runner import ExampleRunner


class TestExampleRunner(RunnerConformance):
    runner_cls = ExampleRunner
    device = "example"
    multimodal = True  # images run through the base, so a runner on it takes them too
