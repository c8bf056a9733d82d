"""The one-shot all-reduce kernel (platforms.symm_mem.OneShotAllReduce) between two processes
whose buffers are shared host memory, each mapped at its own address - as CUDA peers map each
other's - with the kernel in Triton's interpreter. The GPU test is tests/workers/test_tp_gpu.py."""
import multiprocessing as mp

import pytest
import torch

pytestmark = pytest.mark.cpu
pytest.importorskip("triton")

WORLD = 2
MAX_BYTES = 16 << 10
SIZES = (4096, 1000, 4096, 3000, 1, 2048, 4096)  # one program, several, a partial last one


def _inputs(rank: int, call: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * call + rank)
    x = torch.randn(n, generator=g).to(dtype)
    x[::7] = -0.0 if rank == 0 else 0.0  # signed zeros must not read as "not arrived"
    return x


def _rank(rank: int, bufs: list, dtype: torch.dtype, q) -> None:
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    from platforms.symm_mem import OneShotAllReduce
    try:
        ar = OneShotAllReduce(rank, [b.data_ptr() for b in bufs], torch.device("cpu"), dtype, MAX_BYTES)
        for call, n in enumerate(SIZES):
            x = _inputs(rank, call, n, dtype)
            want = sum(_inputs(r, call, n, dtype).float() for r in range(WORLD)).to(dtype)
            got = ar(x)
            assert got is x and torch.equal(got, want), (call, n, (got.float() - want.float()).abs().max())
        q.put((rank, "ok", ar.counters.tolist()))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        q.put((rank, repr(e), None))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_two_processes_sum_each_others_pushes(dtype):
    from platforms.symm_mem import OneShotAllReduce
    n = OneShotAllReduce.buffer_elems(WORLD, dtype, MAX_BYTES)
    bufs = [torch.full((n,), -0.0, dtype=dtype).share_memory_() for _ in range(WORLD)]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, bufs, dtype, q)) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results = sorted(q.get(timeout=240) for _ in range(WORLD))
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert [r[1] for r in results] == ["ok", "ok"], results
    calls = [sum(-(-n // OneShotAllReduce.BLOCK) > p for n in SIZES) for p in range(len(results[0][2]))]
    assert results[0][2] == results[1][2] == calls  # each program counted its own calls
    bits = torch.int16 if dtype == torch.float16 else torch.int32
    for b in bufs:  # every slot read was reset to the sentinel
        assert bool((b.view(bits) == torch.iinfo(bits).min).all())


def test_refuses_what_it_cannot_sum():
    from platforms.symm_mem import OneShotAllReduce
    with pytest.raises(ValueError, match="int32"):
        OneShotAllReduce(0, [0, 0], torch.device("cpu"), torch.int32, 1024)
    ar = OneShotAllReduce(0, [0, 0], torch.device("cpu"), torch.bfloat16, 4096)
    assert ar.accepts(torch.zeros(2048, dtype=torch.bfloat16))
    assert not ar.accepts(torch.zeros(2049, dtype=torch.bfloat16))  # past max_bytes
    assert not ar.accepts(torch.zeros(16, dtype=torch.float32))  # another dtype
    assert not ar.accepts(torch.zeros(8, 4, dtype=torch.bfloat16).t())  # not contiguous
    empty = torch.zeros(0, dtype=torch.bfloat16)
    assert ar(empty) is empty and int(ar.counters.sum()) == 0  # nothing launched, nothing counted


def test_cuda_platform_takes_it_only_when_asked_and_every_rank_has_it(monkeypatch):
    """``CudaPlatform.small_all_reduce``: off unless env RUNNERS_SYMM_MEM_MAX_BYTES > 0; on, every
    rank keeps NCCL when any rank failed to set it up (the ranks agree by an all-reduce)."""
    import platforms.cuda as cuda
    from platforms.symm_mem import OneShotAllReduce

    monkeypatch.setattr(cuda.torch.version, "hip", None)
    made = []
    monkeypatch.setattr(OneShotAllReduce, "from_group", classmethod(lambda cls, *a: made.append(a) or "fast"))
    others = {"ok": 1}

    def all_reduce(t, op=None, group=None):  # the other rank's flag
        t.fill_(min(int(t.item()), others["ok"]))
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    plat = cuda.CudaPlatform()
    cpu = torch.device("cpu")
    monkeypatch.delenv("RUNNERS_SYMM_MEM_MAX_BYTES", raising=False)
    assert plat.small_all_reduce(None, cpu, torch.bfloat16) is None and not made
    monkeypatch.setenv("RUNNERS_SYMM_MEM_MAX_BYTES", "0")
    assert plat.small_all_reduce(None, cpu, torch.bfloat16) is None and not made
    monkeypatch.setenv("RUNNERS_SYMM_MEM_MAX_BYTES", str(1 << 20))
    assert plat.small_all_reduce(None, cpu, torch.bfloat16) == "fast" and made[-1][-1] == 1 << 20
    assert plat.small_all_reduce(None, cpu, torch.int64) is None  # not a dtype it sums
    others["ok"] = 0
    with pytest.warns(UserWarning, match="another rank"):
        assert plat.small_all_reduce(None, cpu, torch.bfloat16) is None

    def broken(cls, *a):
        raise RuntimeError("no peer access")
    monkeypatch.setattr(OneShotAllReduce, "from_group", classmethod(broken))
    others["ok"] = 1
    with pytest.warns(UserWarning, match="this rank.*no peer access"):
        assert plat.small_all_reduce(None, cpu, torch.bfloat16) is None
