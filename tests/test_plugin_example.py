"""An out-of-tree backend package (tests/plugin_example) is discovered through its entry-point
metadata, selected as the platform, and passes the runner conformance suite."""
import os
import pathlib
import subprocess
import sys

import pytest

from runners.testing import RunnerConformance

tomllib = pytest.importorskip("tomllib")
ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "tests" / "plugin_example"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An environment where the package is 'installed': its dist-info (from its pyproject) on the path."""
    site = tmp_path_factory.mktemp("site")
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    dist = site / f"runners_example_backend-{meta['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    lines = ["[runners.platforms]"] + [f"{k} = {v}" for k, v in meta["entry-points"]["runners.platforms"].items()]
    (dist / "entry_points.txt").write_text("\n".join(lines) + "\n")
    e = {k: v for k, v in os.environ.items() if k != "RUNNERS_PLATFORM"}
    e["PYTHONPATH"] = os.pathsep.join([str(site), str(EXAMPLE), str(ROOT)])
    return e


def _py(env, code):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)


def test_plugin_is_discovered_and_selected(env):
    r = _py(env, "import platforms, runners; p = platforms.resolve_platform(); "
                 "print(p.name, runners.get_runner_cls().__name__, 'example' in platforms.known_platforms())")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["example", "ExampleRunner", "True"]


def test_inactive_plugin_falls_back_to_detection(env):
    r = _py({**env, "RUNNERS_EXAMPLE_DEVICE": "0"}, "import platforms; print(platforms.resolve_platform().name)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() != "example"


def test_plugin_passes_the_conformance_suite(env):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(EXAMPLE),
                        str(EXAMPLE / "tests")], env=env, capture_output=True, text=True, cwd=EXAMPLE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    n = sum(name.startswith("test_") for name in dir(RunnerConformance))
    assert f"{n} passed" in r.stdout, r.stdout[-2000:]
