"""``MultiprocExecutor`` (``distributed_executor_backend="mp"``): one spawned process per rank on
this host, each running a ``Worker``; the engine's process only schedules.

Control goes through one ``multiprocessing`` pipe per worker: every message ``(seq, method,
args)`` is pickled once and sent to all ranks, each replies ``(seq, "ok" | "error", payload)``;
a step is answered by rank 0 alone (every rank samples the same tokens; the others write only
to report an error).

Async steps (``execute_model_async``) overlap: a worker launches a step as soon as it arrives
(queued on the device, no host sync) and reads its output back only when a later message
arrives - the next step, after launching it (so the device already has the next step queued
while the host waits for this one's ids), or a ``"collect"`` that ``result()`` sends when
nothing was sent after the step. Any other message first reads back every launched step, so
every rank resolves its steps in launch order and the engine never waits for a reply that no
message will trigger. A worker holds at most one unread step; under the engine's one-step-ahead
loop nothing waits in its pipe while it reads one back (the engine sends its next message only
after it has that reply).

On accelerators both ends poll their pipes for a few milliseconds before blocking, so
back-to-back steps do not pay a sleeping process's wake-up (the CPU platform never spins: the
ranks need the cores). Replies are awaited together with the processes' sentinels, so a worker
that raises or dies is reported at once, naming its rank, and the executor shuts everything
down (a half-done collective cannot be resumed). Workers ignore Ctrl-C (the engine's process
handles it: it is held while a message goes out, so every rank gets it whole; a reply the
engine stopped waiting for is discarded by sequence number) and are killed with their parent
(Linux ``PR_SET_PDEATHSIG``); ``shutdown`` - also run at garbage collection and interpreter
exit, also with a step in flight - leaves no process behind.
"""
from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import tempfile
import threading
import time
import traceback
import weakref
from collections import deque
from typing import Any, NoReturn

from engine.config import EngineConfig
from engine.executor import Executor, StepHandle, WorkerError, WorkerInfo
from engine.outputs import ModelRunnerOutput, SchedulerOutput

SHUTDOWN_GRACE_S = 5.0
PEER_DEATH_GRACE_S = 0.5  # how long a rank's error waits to be explained by another's death
SPIN_S = 0.005  # how long a waiting end polls before it sleeps (accelerators only)


def _poll(conn: multiprocessing.connection.Connection, spin_s: float) -> None:
    """Return once ``conn`` has data or ``spin_s`` has passed (then the caller blocks)."""
    if spin_s:
        deadline = time.perf_counter() + spin_s
        while not conn.poll(0) and time.perf_counter() < deadline:
            pass


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the closed pipe still ends the worker once it next waits


def _worker_main(config: EngineConfig, rank: int, world_size: int, init_method: str,
                 conn: multiprocessing.connection.Connection, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        return
    from workers.worker import Worker  # torch is imported here, in the worker

    worker = Worker(config, rank, world_size, init_method=init_method)
    unread: deque[tuple[int, StepHandle]] = deque()  # launched async steps, oldest first (at most one)

    def read_back() -> None:
        while unread:
            seq, handle = unread.popleft()
            output = handle.result()
            if rank == 0:  # rank 0 answers for the group
                conn.send((seq, "ok", output))

    spin_s = 0.0
    try:
        while True:
            try:
                _poll(conn, spin_s)
                seq, method, args = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return  # the engine's process is gone
            if method == "shutdown":
                conn.send((seq, "ok", None))
                return
            try:
                if method == "execute_model_async":
                    handle = worker.execute_model_async(*args)  # queued behind the unread step
                    read_back()
                    unread.append((seq, handle))
                    continue
                read_back()  # every other message comes after the steps launched before it
                if method == "collect":
                    continue
                result = getattr(worker, method)(*args)
                if method == "init_device" and worker.platform.device_type != "cpu":
                    spin_s = SPIN_S
                if method == "execute_model" and rank != 0:
                    continue
                conn.send((seq, "ok", result))
            except BaseException as e:  # noqa: BLE001 - reported to the engine, which shuts us down
                unread.clear()
                conn.send((seq, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        worker.shutdown()


def _send_all(conns: list[multiprocessing.connection.Connection], data: bytes) -> None:
    """Send ``data`` to every rank. Ctrl-C is held until all have it: a step that reached only
    some ranks (or half a message) would leave the others' collectives waiting for good. (A
    signal mask would not do: the signal may go to another thread, Python still runs its
    handler in this one.)"""
    held: list[object] = []
    previous = None
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None:
        previous = signal.signal(signal.SIGINT, lambda *_: held.append(True))
    try:
        for conn in conns:
            conn.send_bytes(data)
    except OSError:
        pass  # a dead worker's pipe: its sentinel is reported when a reply is awaited
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
            if held:
                signal.raise_signal(signal.SIGINT)  # now, to the caller's handler


def _stop(procs: list[Any], conns: list[Any], tmp: str) -> None:
    """Ask every worker to leave, then terminate and kill stragglers; close pipes; remove ``tmp``."""
    for conn in conns:
        try:
            conn.send_bytes(pickle.dumps((-1, "shutdown", ())))
        except (OSError, ValueError):
            pass
    for p in procs:
        p.join(SHUTDOWN_GRACE_S)
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(SHUTDOWN_GRACE_S)
        if p.is_alive():
            p.kill()
            p.join()
    for conn in conns:
        conn.close()
    shutil.rmtree(tmp, ignore_errors=True)


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        n = config.tensor_parallel_size
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        tmp = tempfile.mkdtemp(prefix="runners-dist-")
        init_method = f"file://{os.path.join(tmp, 'store')}"  # no port to pick or to collide on
        self._procs: list[Any] = []
        self._conns: list[multiprocessing.connection.Connection] = []
        self._seq = 0  # the last message's
        # launched steps whose reply has not come, by seq (weak: an abandoned handle is not kept)
        self._unresolved: weakref.WeakValueDictionary[int, _Step] = weakref.WeakValueDictionary()
        self._spin_s = 0.0
        self._dead: WorkerError | None = None
        self._finalizer = weakref.finalize(self, _stop, self._procs, self._conns, tmp)
        for rank in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker_main, name=f"runners-worker-{rank}",
                            args=(config, rank, n, init_method, child, os.getpid()))
            p.start()
            child.close()
            self._procs.append(p)
            self._conns.append(parent)
        self._call("init_device")

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids, in rank order."""
        return [p.pid for p in self._procs]

    def initialize(self) -> WorkerInfo:
        info = self._call("initialize")[0]
        self._spin_s = SPIN_S if info.platform != "cpu" else 0.0
        return info

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._call("execute_model", scheduler_output, replies=(0,))[0]

    def execute_model_async(self, scheduler_output: SchedulerOutput) -> StepHandle:
        handle = _Step(self, self._send("execute_model_async", scheduler_output))
        self._unresolved[handle.seq] = handle
        return handle

    def shutdown(self) -> None:
        self._finalizer()
        if self._dead is None:
            self._dead = WorkerError("the executor was shut down")

    # -------------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any, replies: tuple[int, ...] | None = None) -> list[Any]:
        """Run ``Worker.<method>(*args)`` on every rank; the results of the ranks in ``replies``
        (default: all) in rank order, None for the others."""
        seq = self._send(method, *args)
        waiting = set(range(len(self._procs)) if replies is None else replies)
        if len(waiting) == 1:
            _poll(self._conns[next(iter(waiting))], self._spin_s)
        return self._gather(seq, method, waiting)

    def _send(self, method: str, *args: Any) -> int:
        """Send ``(seq, method, args)`` to every rank; its sequence number."""
        if self._dead is not None:
            raise WorkerError(f"the workers are gone ({self._dead}); create a new engine", self._dead.rank)
        self._seq += 1
        _send_all(self._conns, pickle.dumps((self._seq, method, args), protocol=pickle.HIGHEST_PROTOCOL))
        return self._seq

    def _step_result(self, seq: int) -> ModelRunnerOutput:
        """Rank 0's output of the async step ``seq`` (its reply may already have come)."""
        if self._dead is not None:
            raise WorkerError(f"the workers are gone ({self._dead}); create a new engine", self._dead.rank)
        if seq == self._seq:  # nothing sent since: the workers read a step back on request
            self._send("collect")
        _poll(self._conns[0], self._spin_s)
        return self._gather(seq, "execute_model", {0})[0]

    def _gather(self, seq: int, method: str, waiting: set[int]) -> list[Any]:
        """Wait for ``waiting``'s replies to call ``seq``; any rank's error or death fails the call."""
        results: list[Any] = [None] * len(self._procs)
        by_conn = {id(c): r for r, c in enumerate(self._conns)}
        by_sentinel = {p.sentinel: r for r, p in enumerate(self._procs)}
        while waiting:
            objs = list(self._conns) + [p.sentinel for p in self._procs]
            ready = multiprocessing.connection.wait(objs)
            for obj in sorted(ready, key=lambda o: isinstance(o, int)):  # replies before deaths
                rank = by_sentinel[obj] if isinstance(obj, int) else by_conn[id(obj)]
                try:
                    if isinstance(obj, int):
                        raise EOFError
                    got, status, payload = obj.recv()
                except (EOFError, OSError):
                    self._fail_died(rank, method)
                if status == "error":  # this call's, or a step's whose only news is this error
                    # a peer's death fails the survivors' collectives: report the death, the cause
                    peers = [p for p, r in by_sentinel.items() if r != rank]
                    dead = multiprocessing.connection.wait(peers, timeout=PEER_DEATH_GRACE_S)
                    if dead:
                        self._fail_died(by_sentinel[dead[0]], method)
                    self._fail(f"worker rank {rank} raised during {method}: {payload}", rank)
                step = self._unresolved.pop(got, None) if rank == 0 else None
                if got != seq or rank not in waiting:
                    if step is not None:  # an earlier step's reply: kept for its handle
                        step.output, step.done = payload, True
                    continue  # or the reply to a call the engine stopped waiting for (Ctrl-C)
                results[rank] = payload
                waiting.discard(rank)
        return results

    def _fail_died(self, rank: int, method: str) -> NoReturn:
        proc = self._procs[rank]
        proc.join(SHUTDOWN_GRACE_S)  # reap it, for its exit code
        self._fail(f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode} during {method}", rank)

    def _fail(self, message: str, rank: int) -> NoReturn:
        err = WorkerError(message, rank)
        self._unresolved.clear()
        self._finalizer()
        self._dead = err
        raise err


class _Step(StepHandle):
    """An async step the workers launched; ``result()`` waits for rank 0's reply."""

    def __init__(self, executor: MultiprocExecutor, seq: int) -> None:
        self._executor, self.seq = executor, seq
        self.output: ModelRunnerOutput | None = None
        self.done = False

    def result(self) -> ModelRunnerOutput:
        if not self.done:
            self.output, self.done = self._executor._step_result(self.seq), True
        return self.output
