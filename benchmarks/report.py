"""Where a benchmark's table goes: stdout, and ``$OUT/<name>`` when OUT is set (the GPU scripts'
collected results)."""
from __future__ import annotations

import os


def publish(text: str, name: str) -> None:
    """Print ``text``; also write it to ``$OUT/name`` when the OUT environment variable is set."""
    print(text)
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, name), "w") as f:
            f.write(text + "\n")
