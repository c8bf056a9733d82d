
import importlib.util

import pytest
import torch

import platforms
from platforms import resolve_platform
from platforms.cpu import CpuPlatform
from platforms.interface import AcceleratorPlatform


def test_env_override_selects_platform(monkeypatch):
    monkeypatch.setenv("RUNNERS_PLATFORM", "cpu")
    assert isinstance(resolve_platform(), CpuPlatform)


def test_explicit_name_wins_over_env(monkeypatch):
    monkeypatch.setenv("RUNNERS_PLATFORM", "does-not-exist")
    assert isinstance(resolve_platform("cpu"), CpuPlatform)


def test_unknown_name_lists_known(monkeypatch):
    monkeypatch.setenv("RUNNERS_PLATFORM", "quantum")
    with pytest.raises(ValueError, match="unknown platform 'quantum'.*'cpu'.*'cuda'.*'tpu'.*'xpu'"):
        resolve_platform()


def test_device_strings_and_aliases():
    assert resolve_platform("cpu:0").name == "cpu"
    assert platforms.parse_device("XLA") == ("tpu", None) and platforms.parse_device("gpu:1") == ("cuda", 1)
    if importlib.util.find_spec("torch_xla") is not None:
        assert resolve_platform("xla").name == "tpu"  # resolving touches no device (torch_xla is lazy)


def test_detection_falls_back_to_cpu(monkeypatch):
    monkeypatch.delenv("RUNNERS_PLATFORM", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert resolve_platform().name == "cpu"


def test_current_platform_is_lazy_and_cached(monkeypatch):
    monkeypatch.setenv("RUNNERS_PLATFORM", "cpu")
    platforms._current.cache_clear()
    try:
        assert platforms.current_platform is platforms.current_platform
        assert platforms.current_platform.name == "cpu"
    finally:
        platforms._current.cache_clear()


def test_cpu_memory_figures_are_real():
    p = CpuPlatform()
    free, total = p.mem_get_info()
    assert 0 < free <= total
    assert total > 2**30
    rss = p.memory_allocated()
    assert rss > 10 * 2**20  # this process holds torch
    p.reset_peak_memory_stats()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert p.max_memory_allocated() >= rss + 48 * 2**20
    del big
    stats = p.memory_stats()
    assert all(v > 0 for v in stats.values()), stats
    p.synchronize()
    p.empty_cache()
    p.seed_everything(3)
    a = torch.rand(3)
    p.seed_everything(3)
    assert torch.equal(a, torch.rand(3))


@pytest.mark.parametrize("flags,half", [("fpu sse avx2 avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                                        ("fpu sse avx2 avx512f avx512bw", False), (None, False)])
def test_cpu_auto_dtype_is_bf16_only_with_bf16_units(tmp_path, monkeypatch, flags, half):
    import platforms.cpu as cpu
    info = tmp_path / "cpuinfo"
    if flags is not None:  # None: no such file (not Linux)
        info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\n")
    assert cpu.native_bf16(str(info)) is half
    monkeypatch.setattr(cpu, "native_bf16", lambda: half)
    p = CpuPlatform()
    want = torch.bfloat16 if half else torch.float32
    assert p.resolve_dtype("auto", "bfloat16") is want
    assert p.resolve_dtype("auto", "float16") is want  # float16 is slow on CPUs
    assert p.resolve_dtype("auto", None) is want
    assert p.resolve_dtype("auto", "float32") is torch.float32  # a float32 checkpoint stays exact
    assert p.resolve_dtype("bfloat16", None) is torch.bfloat16
    assert p.resolve_dtype("float32", "bfloat16") is torch.float32


class _FakeAccelerator:
    """Stands in for torch.accelerator to check the platform routes through it."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def fn(*args):
            self.calls.append(name)
            return {"get_memory_info": (5, 10), "memory_stats": {"a": 1}}.get(name, 7)
        return fn


def test_accelerator_ops_go_through_torch_accelerator(monkeypatch):
    fake = _FakeAccelerator()
    monkeypatch.setattr(torch, "accelerator", fake)

    class P(AcceleratorPlatform):
        name = "fake"
        device_type = "cuda"
        runner_cls = "x:y"

    p = P()
    assert p.mem_get_info() == (5, 10)
    assert p.memory_reserved() == 7 and p.max_memory_allocated() == 7
    p.synchronize(); p.empty_cache(); p.reset_peak_memory_stats(); p.set_device(0)
    assert fake.calls == ["get_memory_info", "memory_reserved", "max_memory_allocated", "synchronize",
                          "empty_cache", "reset_peak_memory_stats", "set_device_index"]


class _EP:
    def __init__(self, name, fn):
        self.name, self._fn = name, fn

    def load(self):
        return self._fn


def _fake_plugins(monkeypatch, eps):
    monkeypatch.setattr(platforms, "entry_points", lambda group: eps if group == platforms.PLUGIN_GROUP else [])


def test_one_active_plugin_is_used(monkeypatch):
    monkeypatch.delenv("RUNNERS_PLATFORM", raising=False)
    _fake_plugins(monkeypatch, [_EP("mydev", lambda: "platforms.cpu:CpuPlatform"), _EP("off", lambda: None)])
    assert isinstance(resolve_platform(), CpuPlatform)
    assert "mydev" in platforms.known_platforms()


def test_two_active_plugins_need_the_env_var(monkeypatch):
    monkeypatch.delenv("RUNNERS_PLATFORM", raising=False)
    _fake_plugins(monkeypatch, [_EP("a", lambda: "platforms.cpu:CpuPlatform"),
                                _EP("b", lambda: "platforms.cpu.CpuPlatform")])
    with pytest.raises(RuntimeError, match="several platform plugins.*RUNNERS_PLATFORM"):
        resolve_platform()
    monkeypatch.setenv("RUNNERS_PLATFORM", "b")
    assert isinstance(resolve_platform(), CpuPlatform)


def test_plugin_that_cannot_run_is_a_clear_error(monkeypatch):
    _fake_plugins(monkeypatch, [_EP("off", lambda: None)])
    with pytest.raises(RuntimeError, match="'off' reports that it cannot run here"):
        resolve_platform("off")
