"""TPGroup: one rank never communicates; the small-message fast path takes what it accepts."""
import pytest
import torch

from distributed import TPGroup

pytestmark = pytest.mark.cpu


class _Fast:
    max_bytes = 1 << 20

    def __init__(self):
        self.calls = 0

    def accepts(self, x):
        return x.numel() * x.element_size() <= 64

    def __call__(self, x):
        self.calls += 1
        return x.mul_(2)


def test_single_rank_is_a_no_op():
    tp = TPGroup.single()
    x = torch.ones(3)
    assert tp.all_reduce(x) is x and tp.all_gather(x) is x


def test_small_messages_take_the_fast_path(monkeypatch):
    tp = TPGroup(1, 2)
    tp.small_all_reduce = fast = _Fast()
    assert torch.equal(tp.all_reduce(torch.ones(4)), torch.full((4,), 2.0)) and fast.calls == 1
    seen = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda x, group=None: seen.append(x.numel()))
    tp.all_reduce(torch.ones(100))  # 400 bytes: past the fast path, to torch.distributed
    assert seen == [100] and fast.calls == 1
    assert tp.describe_all_reduce("nccl") == "_Fast up to 1 MiB, then nccl"
    assert TPGroup(0, 2).describe_all_reduce("gloo") == "gloo"
