"""Prompt types: str, or a sequence of Python/numpy integers; errors name the prompt's index."""
from __future__ import annotations

import numpy as np
import pytest

from engine.config import EngineConfig
from engine.prompts import normalize_prompts
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.cpu


@pytest.mark.parametrize("prompts, expected", [
    ("hi", ["hi"]),
    ([1, 2], [[1, 2]]),
    ((1, 2), [[1, 2]]),
    (np.array([3, 4], dtype=np.int32), [[3, 4]]),
    ([np.int64(5), np.uint8(6)], [[5, 6]]),
    ([[1, 2], "a", np.array([7])], [[1, 2], "a", [7]]),
    (np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]),
    ((p for p in ["a", "b"]), ["a", "b"]),
    ([], []),
])
def test_accepted(prompts, expected):
    out = normalize_prompts(prompts)
    assert out == expected
    assert all(type(t) is int for p in out if not isinstance(p, str) for t in p)


@pytest.mark.parametrize("prompts, message", [
    (b"hello", "prompts: got bytes.*decode bytes to str"),
    (["ok", bytearray(b"x")], "prompt 1: got bytearray"),
    ([True, 2], r"prompt 0: token ids must be integers \(not bool\), got True \(bool\) at position 0"),
    ([np.bool_(True)], "prompt 0: token ids must be integers.*at position 0"),
    ([1, None], r"prompt 0: .*got None \(NoneType\) at position 1"),
    ([1.0, 2.0], r"prompt 0: .*got 1.0 \(float\)"),
    (None, "prompts must be a prompt .* got NoneType"),
    (5, "prompts must be .* got int"),
    ({"a"}, "got set"),
    (["a", None], "prompt 1: expected a str or a sequence of int token ids, got NoneType"),
    (["a", "b", [1, "x"]], r"prompt 2: token ids must be integers.*'x' \(str\) at position 1"),
    ([[[1]]], r"prompt 0: token ids must be integers.*\(list\) at position 0"),
])
def test_rejected_with_the_index(prompts, message):
    with pytest.raises(TypeError, match=message):
        normalize_prompts(prompts)


def test_sampling_params_revalidate_after_a_change():
    sp = SamplingParams(temperature=0.5)
    sp.validate()
    sp.temperature = float("nan")
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0, got nan"):
        sp.validate()


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_seeds_get_our_message(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63\)"):
        EngineConfig(seed=seed)
    if seed is not True:
        with pytest.raises(ValueError, match=r"seed must be None or an integer in \[0, 2\*\*63\)"):
            SamplingParams(seed=seed)
