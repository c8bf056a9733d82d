"""The input builder records the leading pages a pure-decode step's requests share
(``md.shared_prefix_len``, what cascade attention starts from) for eager steps and for steps
padded to a captured decode-graph size alike; never for prefill, mixed or dummy steps, nor for a
backend that does not read it."""
import dataclasses

import numpy as np
import pytest
import torch

from attention.torch_ref import TorchAttentionBackend
from runners.input_batch import InputBatch
from runners.inputs import InputBuilder
from runners.plan import DevicePlan
from runners.step_buffers import StepBuffers

pytestmark = pytest.mark.cpu
BS = 16


class _Cascading(TorchAttentionBackend):
    """A backend whose ``prepare`` reads the shared prefix (as Triton's with cascades on) and
    takes a cascade from 4 requests sharing 16 keys."""

    @classmethod
    def wants_shared_prefix(cls) -> bool:
        return True

    @classmethod
    def prepare(cls, md):
        cascade = md.num_reqs >= 4 and md.shared_prefix_len >= 16
        return dataclasses.replace(md, cascade_prefix_len=16) if cascade else md


def _builder(plan: DevicePlan, backend=_Cascading) -> tuple[InputBuilder, InputBatch]:
    batch = InputBatch(8, 256, 16)
    buffers = StepBuffers(64, 8, 16, torch.device("cpu"), pin_memory=False)
    return InputBuilder(buffers, batch, backend, plan, BS, 256, 16), batch


@pytest.mark.parametrize("plan", [DevicePlan(), DevicePlan(decode_graph_sizes=(1, 2, 4, 8))],
                         ids=["eager", "graph sizes"])
def test_shared_prefix_of_decode_steps(plan):
    builder, batch = _builder(plan)
    shared = [1, 2, 3]  # 48 keys in the same pages for every request
    rows = np.array([batch.add(list(range(60 + i)), shared + [10 + i], 59 + i) for i in range(3)])
    ids = ["a", "b", "c"]
    decode = builder.build(ids, rows, np.ones(3, np.int32))
    assert decode.md.shared_prefix_len == 48
    assert decode.md.shared_prefix.tolist() == [48]  # the device copy the kernels read
    assert builder.build(ids[:1], rows[:1], np.ones(1, np.int32)).md.shared_prefix_len == 0  # one request
    prefill_row = batch.add(list(range(40)), [1, 2, 7], 0)
    prefill = builder.build(["p"], np.array([prefill_row]), np.array([40], np.int32))
    assert prefill.md.shared_prefix_len == 0
    mixed = builder.build(ids + ["p"], np.append(rows, prefill_row), np.array([1, 1, 1, 40], np.int32))
    assert mixed.md.shared_prefix_len == 0  # a prefill row in the step: not a decode step
    assert builder.dummy(3, 3).md.shared_prefix_len == 0
    assert builder.build(ids, rows, np.ones(3, np.int32)).md.shared_prefix.tolist() == [48]


def test_cascade_capture_dummy():
    """Graph capture's cascade dummy: the step ``prepare`` makes a cascade of when its requests
    claim a shared prompt, over no shared keys on the device (what the kernels read), or None
    where the backend takes no cascade."""
    builder, _ = _builder(DevicePlan(decode_graph_sizes=(1, 2, 4, 8)))
    step = builder.dummy(4, 4, cascade=True)
    assert step.md.cascade_prefix_len == 16 and step.md.shared_prefix.tolist() == [0]
    assert builder.dummy(2, 2, cascade=True) is None  # too few requests for this backend
    plain, _ = _builder(DevicePlan(decode_graph_sizes=(1, 2, 4, 8)), TorchAttentionBackend)
    assert plain.dummy(4, 4, cascade=True) is None  # no cascades at all


def test_not_recorded_for_a_backend_that_does_not_read_it():
    builder, batch = _builder(DevicePlan(), TorchAttentionBackend)
    rows = np.array([batch.add(list(range(60 + i)), [1, 2, 3, 10 + i], 59 + i) for i in range(3)])
    md = builder.build(["a", "b", "c"], rows, np.ones(3, np.int32)).md
    assert md.shared_prefix_len == 0 and md.shared_prefix is None


@pytest.mark.parametrize("composite", [False, True], ids=["triton", "composite"])
def test_cascade_capture_dummy_of_the_triton_backend(composite):
    """Triton's own ``prepare`` (directly, or through the composite's decode route) makes the
    capture dummy a cascade step from ``cascade_min_reqs`` requests on."""
    from attention.triton_attn import TritonAttentionBackend
    from tests.attention.composite_backends import TritonTorchComposite

    backend = TritonTorchComposite if composite else TritonAttentionBackend
    builder, _ = _builder(DevicePlan(decode_graph_sizes=(1, 2, 4, 8)), backend)
    step = builder.dummy(8, 8, cascade=True)
    assert step.md.cascade_prefix_len > 0 and step.md.shared_prefix.tolist() == [0]
    if composite:
        assert step.md.extra.route == "decode" and step.md.extra.whole.cascade_prefix_len > 0
    assert builder.dummy(4, 4, cascade=True) is None  # below cascade_min_reqs (8)
