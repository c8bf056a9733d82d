"""Startup errors that name the setting and the fix: absent devices, device indices, failing
plugins (which never break an in-tree platform), plugin availability, dtype="auto" on plugins."""
import importlib.util
import warnings

import pytest
import torch

import platforms
from platforms import PluginError, resolve_platform
from platforms.cpu import CpuPlatform
from platforms.cuda import CudaPlatform
from platforms.interface import AcceleratorPlatform, Platform
from platforms.tpu import TpuPlatform
from platforms.xpu import XpuPlatform

ABSENT = [name for name, present in (("cuda", CudaPlatform.is_available()), ("xpu", XpuPlatform.is_available()),
                                     ("tpu", importlib.util.find_spec("torch_xla") is not None)) if not present]


@pytest.mark.parametrize("device", ABSENT)
def test_absent_device_is_a_clear_error(device, monkeypatch):
    monkeypatch.delenv("RUNNERS_PLATFORM", raising=False)
    with pytest.raises(RuntimeError, match=rf"device='{device}' asks for the .* but .*Use device='cpu'") as e:
        resolve_platform(device)
    assert type(e.value) is RuntimeError  # not an AssertionError / ModuleNotFoundError from torch
    monkeypatch.setenv("RUNNERS_PLATFORM", device)
    with pytest.raises(RuntimeError, match=rf"RUNNERS_PLATFORM='{device}'"):
        resolve_platform()


@pytest.mark.parametrize("device", ABSENT)
def test_llm_on_an_absent_device_fails_before_loading(device):
    from engine import LLM

    with pytest.raises(RuntimeError, match=f"device='{device}'"):
        LLM(device=device, num_kv_blocks=8)


def test_cpu_has_one_device_index():
    assert resolve_platform("cpu:0").device(0) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device='cpu:1': the CPU platform has one device \(index 0\).*"
                                         r"use device='cpu'"):
        resolve_platform("cpu:1")
    with pytest.raises(ValueError, match="index 1"):
        CpuPlatform().device(1)
    for bad in ("cpu:x", "cpu:-1", ":0", "cpu:"):
        with pytest.raises(ValueError, match="'<platform>' or '<platform>:<index>'"):
            resolve_platform(bad)


def test_llm_refuses_cpu_1():
    from engine import LLM

    with pytest.raises(ValueError, match="device='cpu:1'"):
        LLM(device="cpu:1", num_kv_blocks=8)


def test_cli_prints_one_line_not_a_traceback(capsys):
    from entrypoints.cli import main

    assert main(["generate", "--device", "cpu:1", "--num-kv-blocks", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: device='cpu:1'") and err.count("\n") == 1 and "Traceback" not in err


# Plugins -------------------------------------------------------------------------------
class _EP:
    """Stands in for an importlib.metadata.EntryPoint."""

    def __init__(self, name, fn, value="mypkg:register"):
        self.name, self.value, self._fn = name, value, fn

    def load(self):
        return self._fn


def _plugins(monkeypatch, *eps):
    monkeypatch.delenv("RUNNERS_PLATFORM", raising=False)
    monkeypatch.setattr(platforms, "entry_points", lambda group: list(eps) if group == platforms.PLUGIN_GROUP else [])


def _raises():
    raise OSError("driver library libfoo.so not found")


def test_failing_plugin_named_explicitly_names_plugin_and_entry_point(monkeypatch):
    _plugins(monkeypatch, _EP("broken", _raises, "broken_pkg:register"))
    with pytest.raises(PluginError, match=r"platform plugin 'broken' \(entry point 'broken = broken_pkg:register' "
                                          r"in group 'runners.platforms'\) failed in register\(\): OSError: "
                                          r"driver library"):
        resolve_platform("broken")


class _RaisingAvailability(CpuPlatform):
    name = "flaky"

    @classmethod
    def is_available(cls):
        raise RuntimeError("runtime not initialised")


def test_failing_plugin_never_breaks_in_tree_platforms(monkeypatch):
    _plugins(monkeypatch, _EP("broken", _raises), _EP("badpath", lambda: "no_such_module:Nope"),
             _EP("wrongtype", lambda: 42), _EP("flaky", lambda: f"{__name__}:_RaisingAvailability"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(resolve_platform("cpu"), CpuPlatform)  # named: plugins not even loaded
    with pytest.warns(RuntimeWarning) as record:
        detected = resolve_platform()
    assert detected.name == ("cuda" if CudaPlatform.is_available() else "cpu")
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 4 and all("skipped during platform detection" in m for m in messages)
    assert "'badpath'" in messages[0] and "cannot be loaded" in messages[0] and "no_such_module" in messages[0]
    assert "'broken'" in messages[1] and "OSError" in messages[1]
    assert "'flaky'" in messages[2] and "is_available() raised RuntimeError: runtime not" in messages[2]
    assert "'wrongtype'" in messages[3] and "returned 42" in messages[3]


class _AbsentDevice(CpuPlatform):
    name = "absentdev"

    @classmethod
    def is_available(cls):
        return False


def test_plugin_is_available_is_honoured_by_detection_only(monkeypatch):
    _plugins(monkeypatch, _EP("absentdev", lambda: f"{__name__}:_AbsentDevice"))
    assert not isinstance(resolve_platform(), _AbsentDevice)  # detection skips it
    assert isinstance(resolve_platform("absentdev"), _AbsentDevice)  # asked for by name: used


class _PlainPlugin(Platform):
    name = "plain"
    device_type = "cpu"
    runner_cls = "runners.cpu:CPURunner"


class _AcceleratorPlugin(AcceleratorPlatform):
    name = "accel"
    device_type = "cpu"
    runner_cls = "runners.cpu:CPURunner"


@pytest.mark.parametrize("cls", [_PlainPlugin, _AcceleratorPlugin])
def test_auto_dtype_keeps_a_float32_checkpoint_on_plugin_platforms(cls):
    p = cls()
    assert p.resolve_dtype("auto", "float32") is torch.float32
    assert p.resolve_dtype("auto", None) is torch.float32
    assert p.resolve_dtype("auto", "bfloat16") is torch.bfloat16
    assert p.resolve_dtype("float16", "float32") is torch.float16


def test_auto_dtype_of_in_tree_accelerators_is_unchanged(monkeypatch):
    for cls in (CudaPlatform, platforms.load_platform_cls("platforms.cuda:RocmPlatform"), XpuPlatform):
        assert cls().resolve_dtype("auto", "float32") is torch.bfloat16
        assert cls().resolve_dtype("auto", None) is torch.bfloat16
        assert cls().resolve_dtype("auto", "float16") is torch.float16
    monkeypatch.setenv("PJRT_DEVICE", "TPU")
    assert TpuPlatform().resolve_dtype("auto", "float32") is torch.bfloat16
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    assert TpuPlatform().resolve_dtype("auto", "float32") is torch.float32
    assert CpuPlatform().resolve_dtype("auto", "float32") is torch.float32
