"""Executors and workers: lifecycles, failures named by rank, no process left behind, torchrun."""
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from engine import LLM, SamplingParams, WorkerError
from engine.outputs import CachedRequestData, SchedulerOutput

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(device="cpu", num_kv_blocks=64, max_model_len=128, max_num_batched_tokens=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42], list(range(60, 90))]


def _gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return True
        time.sleep(0.1)
    return False


def _children():
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def reference():
    with LLM(**TINY) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_shutdown_leaves_no_process(reference):
    llm = LLM(tensor_parallel_size=2, **TINY)
    assert llm.config.async_scheduling is False, "auto: off on the CPU"
    pids = llm.executor.pids
    assert set(pids) <= _children() and len(pids) == 2
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == reference
    llm.shutdown()
    assert _gone(pids), "worker processes outlived shutdown()"
    llm.shutdown()  # idempotent
    with pytest.raises(WorkerError, match="create a new engine"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)


def test_a_raising_worker_is_named_and_everything_stops():
    llm = LLM(tensor_parallel_size=2, **TINY)
    pids = llm.executor.pids
    bad = SchedulerOutput([], CachedRequestData(["nobody"], [False], [[]], [0]), {"nobody": 1}, 1)
    with pytest.raises(WorkerError, match=r"worker rank \d raised during execute_model: KeyError: 'nobody'") as e:
        llm.executor.execute_model(bad)
    assert e.value.rank in (0, 1)
    assert _gone(pids)
    with pytest.raises(WorkerError, match="the workers are gone"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)


def test_a_dead_worker_is_named_and_everything_stops():
    llm = LLM(tensor_parallel_size=2, **TINY)
    pids = llm.executor.pids
    os.kill(pids[1], signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"worker rank 1 \(pid \d+\) died with exit code -9") as e:
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert e.value.rank == 1
    assert _gone(pids), "rank 0 was left running after rank 1 died"


def test_a_reply_the_engine_stopped_waiting_for_is_discarded(reference):
    with LLM(tensor_parallel_size=2, **TINY) as llm:
        ex = llm.executor
        ex._seq += 1  # a call whose replies nobody collects (as after Ctrl-C in the wait)
        for conn in ex._conns:
            conn.send_bytes(pickle.dumps((ex._seq, "info", ())))
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == reference


SCRIPT = """
import os, sys, time
sys.path.insert(0, {root!r})
from engine import LLM, SamplingParams

if __name__ == "__main__":
    llm = LLM(tensor_parallel_size=2, device="cpu", num_kv_blocks=600, max_model_len=2048)
    print("pids", *llm.executor.pids, flush=True)
    if sys.argv[1] == "ctrl-c":
        llm.generate([[5] * 8] * 4, SamplingParams(max_tokens=2000, ignore_eos=True), use_tqdm=False)
    print("exiting without shutdown", flush=True)
"""


def _start(tmp_path, mode):
    script = tmp_path / "engine_script.py"
    script.write_text(SCRIPT.format(root=ROOT))
    proc = subprocess.Popen([sys.executable, str(script), mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = proc.stdout.readline()
    assert line.startswith("pids"), line + proc.stderr.read()
    return proc, [int(p) for p in line.split()[1:]]


def test_interpreter_exit_stops_the_workers(tmp_path):
    proc, pids = _start(tmp_path, "exit")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert _gone(pids), "worker processes outlived the interpreter"


def test_ctrl_c_stops_the_engine_and_the_workers(tmp_path):
    proc, pids = _start(tmp_path, "ctrl-c")
    time.sleep(1.0)  # inside generate by now
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err
    assert _gone(pids), "worker processes outlived Ctrl-C"


def test_bad_parallel_settings_are_refused_before_any_process_starts(tmp_path):
    before = _children()
    with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide num_attention_heads=8"):
        LLM(tensor_parallel_size=3, **TINY)
    with pytest.raises(ValueError, match="'uni' runs one rank"):
        LLM(tensor_parallel_size=2, distributed_executor_backend="uni", **TINY)
    with pytest.raises(ValueError, match="distributed_executor_backend must be one of"):
        LLM(distributed_executor_backend="ray", **TINY)
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    try:
        with pytest.raises(ValueError, match="torchrun"):
            LLM(distributed_executor_backend="external_launcher", tensor_parallel_size=2, **TINY)
    finally:
        os.environ.update(env)
    assert _children() <= before


TORCHRUN_SCRIPT = """
import json, os, sys
sys.path.insert(0, {root!r})
from engine import LLM, SamplingParams

llm = LLM(tensor_parallel_size=2, distributed_executor_backend="external_launcher", async_scheduling={mode!r},
          **{tiny!r})
outs = llm.generate({prompts!r}, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
spec = llm.runner.kv_cache_spec
with open(os.path.join({out!r}, f"rank{{os.environ['RANK']}}.json"), "w") as f:
    json.dump({{"tokens": [o.outputs[0].token_ids for o in outs], "kv_heads": spec.num_kv_heads,
               "blocks": llm.num_kv_blocks, "ahead": llm.runner.steps_launched_ahead}}, f)
llm.shutdown()
"""


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_torchrun_external_launcher(tmp_path, reference, async_scheduling):
    script = tmp_path / "torchrun_script.py"
    script.write_text(TORCHRUN_SCRIPT.format(root=ROOT, tiny=TINY, prompts=PROMPTS, out=str(tmp_path),
                                             mode=async_scheduling))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for got in ranks:
        assert got["tokens"] == reference, "every rank returns the outputs of one rank"
        assert got["kv_heads"] == 1, "2 KV heads split over 2 ranks"
        assert got["blocks"] == TINY["num_kv_blocks"]
        # async: each rank's runner launched steps before reading the previous one back
        assert (got["ahead"] > 0) == async_scheduling, got["ahead"]


def test_external_launcher_names_its_rank_when_an_async_step_fails(monkeypatch):
    """One torchrun rank (world size 1, so no process group) in this process: the runner's own
    async handles, a failed launch a WorkerError naming the rank."""
    from engine.config import EngineConfig
    from engine.outputs import CachedRequestData, SchedulerOutput
    from workers.external import ExternalLauncherExecutor

    for k, v in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    ex = ExternalLauncherExecutor(EngineConfig.from_kwargs(distributed_executor_backend="external_launcher", **TINY))
    try:
        ex.initialize()
        bad = SchedulerOutput([], CachedRequestData(["nobody"], [False], [[]], [0]), {"nobody": 1}, 1)
        with pytest.raises(WorkerError, match="rank 0 failed: KeyError: 'nobody'") as e:
            ex.execute_model_async(bad)
        assert e.value.rank == 0
    finally:
        ex.shutdown()
