"""The architecture's rules, checked: four hooks per device runner, torch.cuda confined,
engine/ torch-free, the layers import downward."""
import ast
import importlib
import inspect
import pathlib
import subprocess
import sys

import pytest

from runners.base import ModelRunnerBase
from runners.testing import HOOKS, overridden_names

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("entrypoints", "engine", "workers", "runners", "models", "attention", "distributed", "platforms")
DEVICE_RUNNERS = ["runners.cpu:CPURunner", "runners.gpu:GPURunner", "runners.xpu:XPURunner",
                  "runners.tpu:TPURunner"]


def _load(path):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", DEVICE_RUNNERS)
def test_device_runner_overrides_only_the_four_hooks(path):
    cls = _load(path)
    assert issubclass(cls, ModelRunnerBase)
    defined = set()
    for klass in cls.__mro__[:cls.__mro__.index(ModelRunnerBase)]:  # the device side of the hierarchy
        defined |= overridden_names(klass)
    assert defined <= HOOKS, f"{path} defines {sorted(defined - HOOKS)} beyond the hooks"
    for hook in HOOKS:  # and every hook really is implemented (not inherited abstract)
        assert not getattr(getattr(cls, hook), "__isabstractmethod__", False), f"{path}.{hook} is abstract"


def test_base_declares_the_hooks_abstract():
    assert HOOKS <= ModelRunnerBase.__abstractmethods__


def test_torch_cuda_only_in_cuda_platform_and_gpu_runner():
    allowed = {"platforms/cuda.py", "runners/gpu.py"}
    offenders = []
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            rel = f.relative_to(ROOT).as_posix()
            if rel not in allowed and "torch.cuda" in f.read_text():
                offenders.append(rel)
    assert not offenders, f"torch.cuda used outside {sorted(allowed)}: {offenders}"


def test_engine_imports_no_torch():
    mods = [f"engine.{p.stem}" for p in (ROOT / "engine").glob("*.py") if p.stem != "__init__"]
    code = (f"import sys, engine; import {', '.join(mods)}; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_engine_source_has_no_torch_import():
    for f in (ROOT / "engine").rglob("*.py"):
        for line in f.read_text().splitlines():
            s = line.strip()
            assert not (s.startswith("import torch") or s.startswith("from torch")), f"{f}: {line}"


def test_base_stays_small():
    n = len((ROOT / "runners" / "base.py").read_text().splitlines())
    assert n < 700, f"runners/base.py has {n} lines"


def test_public_functions_have_type_hints():
    missing = []
    for pkg in PACKAGES:
        for f in (ROOT / pkg).glob("*.py"):
            if f.stem == "__main__":  # program entries run on import
                continue
            mod = importlib.import_module(f"{pkg}.{f.stem}" if f.stem != "__init__" else pkg)
            for name, obj in vars(mod).items():
                if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                fns = [obj] if inspect.isfunction(obj) else (
                    [v for k, v in vars(obj).items() if inspect.isfunction(v) and not k.startswith("_")]
                    if inspect.isclass(obj) else [])
                for fn in fns:
                    if "return" not in fn.__annotations__:
                        missing.append(f"{mod.__name__}.{fn.__qualname__}")
    assert not missing, f"public functions without a return annotation: {missing}"


def _imported_packages(path: pathlib.Path) -> dict[str, int]:
    """Top-level package of every import in a file (lazy ones inside functions too) -> line."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name.split(".")[0], node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.setdefault(node.module.split(".")[0], node.lineno)
    return found


def _imports_of(pkg: str, forbidden: set[str], allowed: dict[str, set[str]] | None = None) -> list[str]:
    bad = []
    for f in sorted((ROOT / pkg).rglob("*.py")):
        rel = f.relative_to(ROOT).as_posix()
        for name, line in _imported_packages(f).items():
            if name in forbidden and name not in (allowed or {}).get(rel, set()):
                bad.append(f"{rel}:{line} imports {name}")
    return bad


def test_engine_imports_nothing_above_or_below_its_contracts():
    # The engine schedules; it reaches workers only through engine.executor's interface. The lazy
    # ``LLM`` re-export in engine/__init__.py (a string for importlib) is its one upward reference.
    bad = _imports_of("engine", {"torch", "runners", "entrypoints", "workers", "models", "attention", "platforms",
                                 "distributed"})
    assert not bad, bad
    init = (ROOT / "engine" / "__init__.py").read_text()
    assert '"entrypoints.llm"' in init and "def __getattr__" in init


def test_runners_import_no_executor_worker_or_entrypoint():
    # runners/__main__.py is a program entry (nothing imports it) that launches the CLI by name.
    bad = _imports_of("runners", {"workers", "entrypoints"})
    assert not bad, bad
    assert "entrypoints" in (ROOT / "runners" / "__main__.py").read_text()


def test_lower_layers_import_no_upper_layer():
    upper = {"entrypoints", "workers", "runners"}
    for pkg in ("models", "attention", "distributed", "platforms"):
        bad = _imports_of(pkg, upper | ({"models"} if pkg != "models" else set()))
        assert not bad, bad
    assert not _imports_of("workers", {"entrypoints"})
