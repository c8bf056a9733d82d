"""Each tensor-parallel rank reads only its shard of the checkpoint, and dummy weights are the
same model at every tensor-parallel size."""
import pytest
import torch

import models.loader as loader
from attention.torch_ref import TorchAttentionBackend
from distributed import TPGroup

pytestmark = pytest.mark.cpu
REAL_OPEN = loader.safe_open


class _Counting:
    """Wraps ``safe_open``: counts the elements every read materialises."""

    read = 0

    def __init__(self, real):
        self.real = real

    def __enter__(self):
        self.f = self.real.__enter__()
        return self

    def __exit__(self, *exc):
        return self.real.__exit__(*exc)

    def keys(self):
        return self.f.keys()

    def get_tensor(self, name):
        t = self.f.get_tensor(name)
        _Counting.read += t.numel()
        return t

    def get_slice(self, name):
        s = self.f.get_slice(name)

        class Slice:
            def get_shape(self):
                return s.get_shape()

            def __getitem__(self, idx):
                t = s[idx]
                _Counting.read += t.numel()
                return t
        return Slice()


def _load(model_dir, tp, monkeypatch):
    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: _Counting(REAL_OPEN(*a, **k)))
    _Counting.read = 0
    model = loader.load_model(model_dir, torch.float32, "cpu", TorchAttentionBackend, tp)
    return model, _Counting.read


@pytest.mark.parametrize("family", ["qwen3", "llama_tied"])
def test_each_rank_reads_only_its_shard(family, hf_model_factory, monkeypatch):
    model_dir = hf_model_factory(family)
    full, read_full = _load(model_dir, TPGroup.single(), monkeypatch)
    assert read_full == sum(p.numel() for p in full.parameters())
    for rank in range(2):
        shard, read = _load(model_dir, TPGroup(rank, 2), monkeypatch)
        held = sum(p.numel() for p in shard.parameters())
        # what a rank reads is what it holds (a replicated KV head is read once per rank), never
        # the checkpoint: norms and biases are replicated, everything large is halved
        assert read <= held and read < 0.6 * read_full, (read, held, read_full)


def test_dummy_weights_are_one_model_at_every_tp_size():
    import json
    import tempfile

    from models.default import CONFIG

    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/config.json", "w") as f:
            json.dump(CONFIG, f)
        kw = dict(load_format="dummy")
        full = loader.load_model(d, torch.float32, "cpu", TorchAttentionBackend, **kw)
        ranks = [loader.load_model(d, torch.float32, "cpu", TorchAttentionBackend, TPGroup(r, 2), **kw)
                 for r in range(2)]
    layer = [m.model.layers[1] for m in ranks]
    assert torch.equal(torch.cat([x.mlp.gate_up_proj.weight[:384] for x in layer]),
                       full.model.layers[1].mlp.gate_up_proj.weight[:768])
    assert torch.equal(torch.cat([x.self_attn.o_proj.weight for x in layer], 1), full.model.layers[1].self_attn.o_proj.weight)
    assert torch.equal(torch.cat([m.lm_head.weight for m in ranks]), full.lm_head.weight)
    assert torch.equal(ranks[0].model.norm.weight, torch.ones(256))
