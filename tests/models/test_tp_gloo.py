"""Tensor parallelism end to end: two CPU processes (gloo) each load their shard, and the
all-reduced / all-gathered logits equal HF's. Proves the layers shard as an addition."""
import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.hf_models import hf_logits

pytestmark = pytest.mark.cpu

TP = 2
LENGTHS = (9, 3, 17)


def _worker(rank: int, model_dirs: list[str], out_dir: str, init_file: str) -> None:
    import torch.distributed as dist

    from distributed import TPGroup
    from models.loader import load_model
    from tests.models.paged import REF_BACKEND, positions_of, prefill_metadata

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP)
    try:
        for i, model_dir in enumerate(model_dirs):
            model = load_model(model_dir, torch.float32, torch.device("cpu"), REF_BACKEND, TPGroup(rank, TP))
            ids = _ids(model.config.vocab_size)
            lengths = [len(s) for s in ids]
            with torch.no_grad():
                hidden = model(torch.tensor(sum(ids, [])), positions_of([0] * len(ids), lengths),
                               [None] * model.config.num_hidden_layers, prefill_metadata(lengths))
                logits = model.compute_logits(hidden)
            torch.save(logits, os.path.join(out_dir, f"{i}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _ids(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def test_two_rank_tensor_parallel_matches_hf(hf_model_factory, tmp_path):
    from tests.hf_models import make_hf_model

    model_dirs = [
        hf_model_factory("qwen3"),  # 8 q heads / 4 kv heads split over 2 ranks, q/k norm
        hf_model_factory("qwen2"),  # q/k/v biases split, o_proj without bias
        # one KV head replicated on both ranks, tied embeddings over an odd vocabulary (padded row),
        # o_proj and down_proj biases added once after the all-reduce
        make_hf_model("llama_tied", tmp_path / "odd_vocab", vocab_size=383),
    ]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mp.start_processes(_worker, args=([str(d) for d in model_dirs], str(out_dir), str(tmp_path / "init")),
                       nprocs=TP, join=True, start_method="spawn")
    for i, model_dir in enumerate(model_dirs):
        per_rank = [torch.load(out_dir / f"{i}_{r}.pt") for r in range(TP)]
        assert torch.equal(per_rank[0], per_rank[1])
        start = 0
        for seq in _ids(per_rank[0].shape[1]):
            torch.testing.assert_close(per_rank[0][start:start + len(seq)], hf_logits(str(model_dir), seq),
                                       atol=1e-4, rtol=0)
            start += len(seq)
