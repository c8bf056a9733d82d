"""Per-device suites: tests marked ``gpu``/``xpu``/``tpu`` run where that device is present and
are skipped with the reason elsewhere; unmarked tests are CPU tests. ``--device D`` runs only
D's tests (cpu, gpu, xpu, tpu; default: all that can run here)."""
import importlib.util
import os

import pytest
import torch

os.environ.setdefault("RUNNERS_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "runners"))
# Without an accelerator, Triton kernels run in its interpreter (must be set before triton imports).
if not torch.accelerator.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE_MARKS = ("gpu", "xpu", "tpu")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="all", choices=["all", "cpu", *DEVICE_MARKS],
                     help="run only this device's tests (unmarked tests are cpu tests)")


def _present() -> dict[str, str | None]:
    """device mark -> None if present, else why not."""
    from platforms.cuda import CudaPlatform, RocmPlatform
    from platforms.xpu import XpuPlatform

    gpu = CudaPlatform.is_available() or RocmPlatform.is_available()
    return {"gpu": None if gpu else "no CUDA/ROCm GPU here",
            "xpu": None if XpuPlatform.is_available() else "no Intel XPU here",
            "tpu": None if importlib.util.find_spec("torch_xla") else
            "torch_xla is not installed (the TPU CI step, .ci/tpu, has its own venv)"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wanted = config.getoption("--device")
    present = _present()
    for item in items:
        kind = next((m for m in DEVICE_MARKS if item.get_closest_marker(m)), "cpu")
        if wanted != "all" and kind != wanted:
            item.add_marker(pytest.mark.skip(reason=f"--device={wanted}: this is a {kind} test"))
        elif kind != "cpu" and present[kind]:
            item.add_marker(pytest.mark.skip(reason=f"{kind} test: {present[kind]}"))

collect_ignore = ["plugin_example"]  # an out-of-tree package: test_plugin_example.py runs its suite
