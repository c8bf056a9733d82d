"""The one-shot all-reduce on two GPUs, eager and replayed from CUDA graphs, against NCCL."""
import os
import tempfile

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")

SIZES = (4096, 4096 * 3, 1000, 1, 65536, 4096)


def _rank(rank: int, init: str) -> None:
    import torch.distributed as dist

    from platforms.symm_mem import OneShotAllReduce

    torch.cuda.set_device(rank)
    dev = torch.device(f"cuda:{rank}")
    dist.init_process_group("nccl", init_method=init, rank=rank, world_size=2, device_id=dev)
    try:
        for dtype in (torch.bfloat16, torch.float32):
            ar = OneShotAllReduce.from_group(None, dev, dtype, 1 << 20)
            g = torch.Generator(device=dev).manual_seed(rank)
            xs = [torch.randn(n, device=dev, generator=g).to(dtype) for n in SIZES]
            for x in xs:
                x[::5] = -0.0
            want = [x.clone() for x in xs]
            for w in want:
                dist.all_reduce(w)
            for x, w in zip(xs, want):  # eager
                assert torch.equal(ar(x.clone()), w), (dtype, x.numel())
            ins = [x.clone() for x in xs]
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = [ar(i) for i in ins]
            for _ in range(3):  # each replay reuses the regions in turn
                for i, x in zip(ins, xs):
                    i.copy_(x)
                graph.replay()
                for o, w in zip(outs, want):
                    assert torch.equal(o, w), (dtype, o.numel(), "graph")
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group()


def test_two_ranks_on_one_gpu_side_by_side():
    """Both ranks' kernels on one GPU, on two streams at once (the compiled kernel: its pushes,
    its spin on the sentinel, its reset, its per-program region counters). Each rank's kernel is
    first run alone against a peer push written by hand, so both are loaded before either spins
    (loading a kernel into a context may wait for the context's running kernels)."""
    from platforms.symm_mem import OneShotAllReduce

    dev = torch.device("cuda")
    for dtype in (torch.bfloat16, torch.float32):
        bufs = [torch.full((OneShotAllReduce.buffer_elems(2, dtype, 1 << 20),), -0.0, dtype=dtype, device=dev)
                for _ in range(2)]
        ars = [OneShotAllReduce(r, [b.data_ptr() for b in bufs], dev, dtype, 1 << 20) for r in range(2)]
        g = torch.Generator(device=dev).manual_seed(0)
        n, slot = 3000, ars[0].max_elems
        xs = [torch.randn(n, device=dev, generator=g).to(dtype) for _ in range(2)]
        want = (xs[0].float() + xs[1].float()).to(dtype)
        bufs[0][slot:slot + n] = xs[1]  # region 0, slot 1: what rank 1 would push
        assert torch.equal(ars[0](xs[0].clone()), want)  # pushes xs[0] into rank 1's region 0
        assert torch.equal(ars[1](xs[1].clone()), want)  # reads it (and pushes into rank 0's again)
        torch.cuda.synchronize()
        bufs[0].fill_(-0.0)  # rank 0 took its peer's value from the hand-written push
        streams = [torch.cuda.Stream() for _ in range(2)]
        for call in range(3):
            for n in SIZES:
                xs = [torch.randn(n, device=dev, generator=g).to(dtype) for _ in range(2)]
                xs[0][::5] = -0.0
                want = (xs[0].float() + xs[1].float()).to(dtype)
                torch.cuda.synchronize()
                outs = []
                for ar, s, x in zip(ars, streams, xs):
                    with torch.cuda.stream(s):
                        outs.append(ar(x.clone()))
                torch.cuda.synchronize()
                for o in outs:
                    assert torch.equal(o, want), (dtype, n, call)
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert all(bool((b.view(bits) == torch.iinfo(bits).min).all()) for b in bufs)
        assert torch.equal(ars[0].counters, ars[1].counters) and ars[0].counters[0].item() == 1 + 3 * len(SIZES)


@two_gpus
def test_one_shot_equals_nccl_eager_and_in_graphs(monkeypatch):
    import torch.multiprocessing as mp

    for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        monkeypatch.setenv(var, os.environ.get(var, value))
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_rank, args=(f"file://{d}/store",), nprocs=2, start_method="spawn")
