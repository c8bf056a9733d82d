"""``MultiprocExecutor`` (``distributed_executor_backend="mp"``): one spawned process per rank on
this host, each running a ``Worker``; the engine's process only schedules.

Control goes through one ``multiprocessing`` pipe per worker: every call is pickled once and
sent to all ranks, each replies ``(seq, "ok" | "error", payload)``; for a step only rank 0's
payload carries the ``ModelRunnerOutput`` (every rank samples the same tokens). Replies are
awaited together with the processes' sentinels, so a worker that raises or dies is reported
at once, naming its rank, and the executor shuts everything down (a half-done collective
cannot be resumed). Workers ignore Ctrl-C (the engine's process handles it: a step it stopped
waiting for is discarded by sequence number) and are killed with their parent (Linux
``PR_SET_PDEATHSIG``); ``shutdown`` - also run at garbage collection and interpreter exit -
leaves no process behind.
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
import traceback
import weakref
from typing import Any

from engine.config import EngineConfig
from engine.executor import Executor, WorkerError, WorkerInfo
from engine.outputs import ModelRunnerOutput, SchedulerOutput

SHUTDOWN_GRACE_S = 5.0


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
    try:
        while True:
            try:
                seq, method, args = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return  # the engine's process is gone
            if method == "shutdown":
                conn.send((seq, "ok", None))
                return
            try:
                result = getattr(worker, method)(*args)
                if method == "execute_model" and rank != 0:
                    result = None  # rank 0 answers for the group
                conn.send((seq, "ok", result))
            except BaseException as e:  # noqa: BLE001 - reported to the engine, which shuts us down
                conn.send((seq, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        worker.shutdown()


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
        self._seq = 0
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
        return self._call("initialize")[0]

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self._call("execute_model", scheduler_output)[0]

    def shutdown(self) -> None:
        self._finalizer()
        if self._dead is None:
            self._dead = WorkerError("the executor was shut down")

    # -------------------------------------------------------------------------------------
    def _call(self, method: str, *args: Any) -> list[Any]:
        """Run ``Worker.<method>(*args)`` on every rank; their results in rank order."""
        if self._dead is not None:
            raise WorkerError(f"the workers are gone ({self._dead}); create a new engine", self._dead.rank)
        self._seq += 1
        data = pickle.dumps((self._seq, method, args), protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for conn in self._conns:
                conn.send_bytes(data)
        except OSError:
            pass  # a dead worker's pipe: its sentinel is reported below
        return self._gather(self._seq, method)

    def _gather(self, seq: int, method: str) -> list[Any]:
        results: list[Any] = [None] * len(self._procs)
        waiting = set(range(len(self._procs)))
        by_conn = {id(c): r for r, c in enumerate(self._conns)}
        by_sentinel = {p.sentinel: r for r, p in enumerate(self._procs)}
        while waiting:
            objs = [self._conns[r] for r in waiting] + [self._procs[r].sentinel for r in waiting]
            ready = multiprocessing.connection.wait(objs)
            for obj in sorted(ready, key=lambda o: isinstance(o, int)):  # replies before deaths
                if isinstance(obj, int):
                    rank = by_sentinel[obj]
                    if rank in waiting:
                        self._procs[rank].join(SHUTDOWN_GRACE_S)  # reap it, for its exit code
                        self._fail(f"worker rank {rank} (pid {self._procs[rank].pid}) died with exit code "
                                   f"{self._procs[rank].exitcode} during {method}", rank)
                    continue
                rank = by_conn[id(obj)]
                try:
                    got, status, payload = obj.recv()
                except (EOFError, OSError):
                    self._procs[rank].join(SHUTDOWN_GRACE_S)
                    self._fail(f"worker rank {rank} (pid {self._procs[rank].pid}) closed its pipe during "
                               f"{method} (exit code {self._procs[rank].exitcode})", rank)
                if got != seq:
                    continue  # the reply to a call the engine stopped waiting for (Ctrl-C)
                if status == "error":
                    self._fail(f"worker rank {rank} raised during {method}: {payload}", rank)
                results[rank] = payload
                waiting.discard(rank)
        return results

    def _fail(self, message: str, rank: int) -> None:
        err = WorkerError(message, rank)
        self._finalizer()
        self._dead = err
        raise err
