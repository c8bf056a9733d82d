"""The conformance suite fails broken runners, and says why: each broken runner below runs
through runners.testing (pytester, in-process) and must fail with a message that names the
hook, the setting or the tokens."""
import pytest

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.cpu

BROKEN = '''
import psutil
import torch

from platforms.cpu import CpuPlatform
from runners.accelerator import AcceleratorRunner
from runners.cpu import CPURunner
from runners.testing import RunnerConformance


class ForgetsReturn(CPURunner):
    def profile_run(self):
        CPURunner.profile_run(self)


class NoModel(CPURunner):
    def load_model(self):
        self.net = self._build_model()


class IgnoresOverrides(CPURunner):
    def profile_run(self):
        free, _ = self.platform.mem_get_info()
        return min(free // 2 // self.kv_cache_spec.bytes_per_block, 100)


class SizesFromPsutil(CPURunner):
    def profile_run(self):
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        return int(psutil.virtual_memory().available * 0.9) // self.kv_cache_spec.bytes_per_block


class AcceleratorOnHostRam(AcceleratorRunner):
    def _cache_device_properties(self):
        return self.default_plan(decode_graph_sizes=())


class WrongTokens(CPURunner):
    def load_model(self):
        self.model = self._build_model()
        with torch.no_grad():
            self.model.lm_head.weight.mul_(-1)


class OldStyleHook(CPURunner):
    def _cache_device_properties(self):
        self.token_buckets = [8, 16]


class SetsLooseState(CPURunner):
    def capture_model(self):
        self.decode_buckets = [1, 2]


class ReplacesMethod(CPURunner):
    def load_model(self):
        self.model = self._build_model()
        self._forward = lambda step: self.model(step.input_ids, step.positions, [None] * 2, step.md)


class ZeroMemory(CpuPlatform):
    def mem_get_info(self):
        return 0, 0


class TestForgetsReturn(RunnerConformance):
    runner_cls, device = ForgetsReturn, "cpu"


class TestNoModel(RunnerConformance):
    runner_cls, device = NoModel, "cpu"


class TestIgnoresOverrides(RunnerConformance):
    runner_cls, device = IgnoresOverrides, "cpu"


class TestSizesFromPsutil(RunnerConformance):
    runner_cls, device = SizesFromPsutil, "cpu"


class TestAcceleratorOnHostRam(RunnerConformance):
    runner_cls, device = AcceleratorOnHostRam, "cpu"


class TestWrongTokens(RunnerConformance):
    runner_cls, device = WrongTokens, "cpu"


class TestOldStyleHook(RunnerConformance):
    runner_cls, device = OldStyleHook, "cpu"


class TestSetsLooseState(RunnerConformance):
    runner_cls, device = SetsLooseState, "cpu"


class TestReplacesMethod(RunnerConformance):
    runner_cls, device = ReplacesMethod, "cpu"


class TestZeroMemoryPlatform(RunnerConformance):
    runner_cls, platform = CPURunner, ZeroMemory()
'''

EXPECTED = {  # test id -> what its failure must say
    "TestForgetsReturn::test_prefill_then_decode":
        "ForgetsReturn.profile_run() must return the number of KV blocks, an int >= 2",
    "TestNoModel::test_prefill_then_decode": "NoModel.load_model() must set self.model",
    "TestIgnoresOverrides::test_prefill_then_decode":
        "IgnoresOverrides.profile_run() returned 100 KV blocks; the engine's num_kv_blocks=64 gives 64",
    "TestIgnoresOverrides::test_kv_cache_memory_bytes_is_honoured":
        "IgnoresOverrides.profile_run() returned 100 KV blocks for kv_cache_memory_bytes",
    "TestSizesFromPsutil::test_kv_sizing_within_a_small_memory_budget":
        "without asking the platform how much memory is free",
    "TestAcceleratorOnHostRam::test_kv_sizing_within_a_small_memory_budget":
        "more than half of the host RAM the platform reported free while sizing",
    "TestWrongTokens::test_prefill_then_decode": "prefill then decode: greedy tokens differ from the reference",
    "TestOldStyleHook::test_prefill_then_decode": "OldStyleHook._cache_device_properties() must return a DevicePlan",
    "TestSetsLooseState::test_prefill_then_decode": "SetsLooseState.capture_model() set ['decode_buckets']",
    "TestReplacesMethod::test_prefill_then_decode":
        "ReplacesMethod.load_model(): the instance attributes ['_forward'] replace methods",
    "TestZeroMemoryPlatform::test_kv_sizing_within_a_small_memory_budget":
        "CPURunner cannot size its KV cache on MemoryBudget(ZeroMemory",
}
SELECT = ("test_prefill_then_decode or test_kv_cache_memory_bytes_is_honoured or "
          "test_kv_sizing_within_a_small_memory_budget")


def test_the_suite_names_what_broke(pytester):
    pytester.makepyfile(test_broken=BROKEN)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-k", SELECT, "-q")
    failures: dict[str, str] = {}  # test id -> its failure reports (setup or call)
    for r in result.reprec.getreports("pytest_runtest_logreport"):
        if r.failed:
            failures[r.nodeid.split("::", 1)[1]] = failures.get(r.nodeid.split("::", 1)[1], "") + str(r.longrepr)
    for test_id, message in EXPECTED.items():
        assert test_id in failures, f"{test_id} should have failed; failed: {sorted(failures)}"
        assert message in failures[test_id], (test_id, failures[test_id][-1500:])
    tokens = failures["TestWrongTokens::test_prefill_then_decode"]
    assert "expected [" in tokens and "actual   [" in tokens
    # A correct runner's tests pass even beside broken ones: the override checks don't fail sizing.
    assert "TestIgnoresOverrides::test_kv_sizing_within_a_small_memory_budget" not in failures
    assert "TestSizesFromPsutil::test_prefill_then_decode" not in failures
    assert "TestZeroMemoryPlatform::test_prefill_then_decode" not in failures


@pytest.mark.parametrize("count", [None, 1, 2.5])
def test_a_bad_block_count_names_profile_run_outside_the_suite_too(count):
    """The engine path (Worker: profile_run, then initialize_kv_cache) names the hook as well."""
    from engine.config import EngineConfig
    from runners.cpu import CPURunner

    runner = CPURunner(EngineConfig(device="cpu", num_kv_blocks=8, max_model_len=64))
    with pytest.raises(ValueError, match=rf"need an int >= 2 KV blocks .*CPURunner.profile_run\(\) returns the count"
                                         rf"\), got {count}"):
        runner.initialize_kv_cache(count)
