"""The scheduler with images (torch-free): the encoder budget per step, and block hashes keyed by
image content."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.multimodal import MultiModalInput, fit_encoder_budget
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler

pytestmark = pytest.mark.cpu
PAD = 99


def _image(offset: int, length: int, seed: int = 0) -> MultiModalInput:
    return MultiModalInput(offset, length, hashlib.sha256(bytes([seed])).digest(),
                           np.zeros((length * 4, 8), np.float32), (1, 2, 2 * length))


def _req(rid: str, text: list[int], images: list[tuple[int, int, int]]) -> Request:
    """``text`` with image runs (offset, length, seed) of PAD tokens written over it."""
    ids = list(text)
    for off, n, _ in images:
        ids[off:off + n] = [PAD] * n
    return Request(rid, ids, SamplingParams(max_tokens=2, ignore_eos=True),
                   mm_inputs=tuple(_image(o, n, s) for o, n, s in images))


def _sched(**kw: object) -> Scheduler:
    return Scheduler(EngineConfig(**{"max_model_len": 128, "block_size": 8, **kw}), 64)  # type: ignore[arg-type]


def test_fit_encoder_budget_cuts_before_an_image_that_does_not_fit() -> None:
    images = (_image(4, 10), _image(20, 6))
    assert fit_encoder_budget(images, 0, 30, False, 16) == (30, 16)
    assert fit_encoder_budget(images, 0, 30, False, 12) == (20, 10)  # the second image waits
    assert fit_encoder_budget(images, 0, 30, False, 5) == (4, 0)  # text up to the first one
    assert fit_encoder_budget(images, 8, 10, False, 0) == (10, 0)  # inside image 0: encoded already
    assert fit_encoder_budget(images, 8, 10, True, 0) == (0, 0)  # fresh (a hit inside it): encode again
    assert fit_encoder_budget(images, 8, 10, True, 10) == (10, 10)


def test_encoder_budget_spreads_images_over_steps() -> None:
    s = _sched(max_num_encoder_input_tokens=8)
    a = _req("a", list(range(30)), [(2, 6, 1), (12, 6, 2)])
    b = _req("b", list(range(100, 120)), [(3, 4, 3)])
    s.add_request(a)
    s.add_request(b)
    # a's first image (6) fits, its second (6 more) does not: a stops before it; b before its own
    assert s.schedule().num_scheduled_tokens == {"a": 12, "b": 3}
    assert s.schedule().num_scheduled_tokens == {"a": 18}  # a's second image: 2 left, b's needs 4
    assert s.schedule().num_scheduled_tokens == {"a": 1, "b": 17}


def test_an_image_larger_than_the_set_budget_is_refused() -> None:
    s = _sched(max_num_encoder_input_tokens=4)
    with pytest.raises(ValueError, match=r"image of 6 tokens exceeds the encoder budget of 4"):
        s.add_request(_req("a", list(range(20)), [(2, 6, 1)]))
    s = _sched(max_num_batched_tokens=4)  # unset: the budget grows to the largest image
    s.add_request(_req("a", list(range(20)), [(2, 6, 1)]))
    assert s.encoder_budget == 6


def test_block_hashes_key_on_image_content() -> None:
    s = _sched(enable_prefix_caching=True)
    first = _req("a", list(range(30)), [(10, 8, 1)])
    s.add_request(first)
    s.schedule()
    same, other = _req("b", list(range(30)), [(10, 8, 1)]), _req("c", list(range(30)), [(10, 8, 2)])
    assert s.kv.get_computed_blocks(same)[1] == 24  # every full block but the last token's
    assert s.kv.get_computed_blocks(other)[1] == 8  # only the block before the image
