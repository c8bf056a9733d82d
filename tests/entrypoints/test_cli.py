"""The command line: help text, generate's output and messages, and ``chat`` driven through a
pseudo-terminal as a user would (streamed replies, history, /reset, Ctrl-C, Ctrl-D)."""
import os
import pathlib
import pty
import select
import subprocess
import sys
import time

import pytest

from engine import LLM, SamplingParams
from entrypoints import cli
from models.default import default_model_dir

pytestmark = pytest.mark.cpu

ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--model", None, "--num-kv-blocks", "64", "--max-model-len", "512"]


def _tiny_args() -> list[str]:
    return [default_model_dir() if a is None else a for a in TINY]


def test_help_is_plain_and_every_option_explained():
    p = cli.parser("model-runners")
    texts = [p.format_help()] + [a.format_help() for a in p._subparsers._group_actions[0].choices.values()]
    for text in texts:
        assert "``" not in text and ":class:" not in text
    for sub in p._subparsers._group_actions[0].choices.values():
        for action in sub._actions:
            assert action.help, f"{action.option_strings} has no help"
    gen = texts[1]
    assert "usage: model-runners generate" in gen and "(default: 64)" in gen and "(default: 0.0)" in gen


def test_prog_names_how_it_was_started(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/model-runners"])
    assert cli._prog() == "model-runners"
    monkeypatch.setattr(sys, "argv", [str(ROOT / "runners" / "__main__.py")])
    assert cli._prog() == "python -m runners"


def test_no_command_names_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert "a command is required: generate (complete prompts) or chat" in capsys.readouterr().err


def test_generate_prints_counts_and_reports_truncation(capsys):
    assert cli.main(["generate", *_tiny_args(), "--max-model-len", "40", "--prompt", "", "--prompt", "ab",
                     "--max-tokens", "50", "-n", "2", "--ignore-eos"]) == 0
    out, err = capsys.readouterr()
    assert "--- '' (1 prompt token)" in out and "--- 'ab' (3 prompt tokens)" in out
    assert out.count("finish=length]") == 4 and "[39 tokens, finish=length]" in out
    assert "KV cache          64 blocks x 16 tokens = 1,024 tokens" in out
    assert err.startswith("warning: prompt 0: max_tokens=50 is more than max_model_len=40 leaves after its 1 "
                          "prompt tokens: at most 39 tokens are generated")


def _read_until(fd: int, marker: bytes, buf: bytearray, timeout: float = 60.0) -> bytes:
    """Read the pty until ``marker`` appears; returns (and consumes) everything up to its end."""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} within {timeout} s; got {bytes(buf)[-400:]!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            assert chunk, f"output ended before {marker!r}; got {bytes(buf)[-400:]!r}"
            buf += chunk
    end = buf.index(marker) + len(marker)
    out = bytes(buf[:end])
    del buf[:end]
    return out


def _set_controlling_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty (so Ctrl-C sends SIGINT)."""
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_chat_in_a_terminal():
    args = [*_tiny_args(), "--max-model-len", "256", "--temperature", "0", "--max-tokens", "none"]
    params = SamplingParams(temperature=0.0, top_p=0.9, max_tokens=None, seed=0)
    llm = LLM(model=default_model_dir(), num_kv_blocks=64, max_model_len=256, seed=0)
    first = [{"role": "user", "content": "go"}]
    reply = llm.chat(first, params, use_tqdm=False)[0].outputs[0]
    again = llm.chat(first + [{"role": "assistant", "content": reply.text}, {"role": "user", "content": "x"}],
                     params, use_tqdm=False)[0].outputs[0]
    story = llm.chat([{"role": "user", "content": "tell me a story"}], params, use_tqdm=False)[0].outputs[0]
    assert reply.text and again.text and len(story.token_ids) > 150, "a long reply to interrupt"

    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "runners", "chat", *args], stdin=slave, stdout=slave,
                            stderr=slave, cwd=ROOT, env=env, close_fds=True, start_new_session=True,
                            preexec_fn=_set_controlling_terminal)
    os.close(slave)
    buf = bytearray()
    try:
        _read_until(master, b"Ctrl-D or /exit quits\r\n> ", buf)
        os.write(master, b"go\n")
        out = _read_until(master, b"\r\n> ", buf)
        # the terminal echoes the line, then the streamed reply (newlines become CR LF)
        assert out.startswith(b"go\r\n") and reply.text.replace("\n", "\r\n").encode() in out
        os.write(master, b"x\n")  # the reply to the second turn depends on the first
        assert again.text.replace("\n", "\r\n").encode() in _read_until(master, b"\r\n> ", buf)
        os.write(master, b"/reset\n")
        assert b"(conversation cleared)" in _read_until(master, b"\r\n> ", buf)
        os.write(master, b"tell me a story\n")
        _read_until(master, b"story\r\n", buf)
        while not buf:  # the reply has started streaming
            if select.select([master], [], [], 30)[0]:
                buf += os.read(master, 4096)
        os.write(master, b"\x03")  # Ctrl-C stops the reply, not the program
        stopped = _read_until(master, b"\r\n> ", buf)
        assert b"(reply stopped)" in stopped and len(stopped) < len(story.text.encode())
        os.write(master, b"\x04")  # Ctrl-D on an empty line quits
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
