"""Every SamplingParams field is validated: a bad value raises ValueError naming the field."""
import math

import pytest

from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.cpu

BAD = [
    ("temperature", -0.1), ("temperature", math.inf), ("temperature", math.nan), ("temperature", "1"),
    ("temperature", True),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", math.nan),
    ("min_p", -0.01), ("min_p", 1.5),
    ("presence_penalty", -2.01), ("presence_penalty", 2.5), ("presence_penalty", math.inf),
    ("frequency_penalty", -3.0), ("frequency_penalty", 2.01),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("seed", -1), ("seed", 2**63), ("seed", 1.0), ("seed", "7"),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0), ("max_tokens", "8"),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 0.5),  # max_tokens defaults to 16
    ("stop_token_ids", [-1]), ("stop_token_ids", [1, "2"]), ("stop_token_ids", 5),
    ("stop_token_ids", "ab"), ("stop_token_ids", [True]),
    ("stop", [""]), ("stop", ["ok", 3]), ("stop", 5), ("stop", ""),
    ("ignore_eos", 1), ("ignore_eos", "yes"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 1.0), ("logprobs", True),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", 2.0),
    ("n", 0), ("n", -1), ("n", 1.0), ("n", True),
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingParams(**{field: value})


GOOD = [
    ("temperature", 0.0), ("temperature", 2), ("top_k", -1), ("top_k", 0), ("top_k", 50),
    ("top_p", 1e-9), ("top_p", 1.0), ("min_p", 0.0), ("min_p", 1.0),
    ("presence_penalty", -2.0), ("presence_penalty", 2.0), ("frequency_penalty", 1.5),
    ("repetition_penalty", 1e-3), ("repetition_penalty", 3.0), ("seed", 0), ("seed", 2**63 - 1),
    ("max_tokens", 1), ("min_tokens", 16), ("stop_token_ids", (1, 2)), ("stop", ("a", "bc")),
    ("ignore_eos", True), ("logprobs", 0), ("logprobs", 20), ("logprobs", None), ("seed", None),
    ("max_tokens", None), ("prompt_logprobs", 0), ("prompt_logprobs", 20), ("n", 1), ("n", 8),
]


@pytest.mark.parametrize("field,value", GOOD)
def test_good_value_is_kept(field, value):
    p = SamplingParams(**{field: value})
    assert getattr(p, field) == (list(value) if isinstance(value, tuple) else value)


def test_min_tokens_range_follows_max_tokens():
    SamplingParams(max_tokens=40, min_tokens=40)
    with pytest.raises(ValueError, match=r"min_tokens must be an integer in \[0, max_tokens=4\]"):
        SamplingParams(max_tokens=4, min_tokens=5)


def test_max_tokens_none_lifts_the_min_tokens_bound():
    assert SamplingParams(max_tokens=None, min_tokens=10_000).max_tokens is None


def test_samples_of_n_get_consecutive_seeds():
    p = SamplingParams(n=3, seed=10, temperature=0.7)
    assert [(q.n, q.seed, q.temperature) for q in map(p.sample, range(3))] == [(1, 10, 0.7), (1, 11, 0.7), (1, 12, 0.7)]
    assert SamplingParams(n=2).sample(1).seed is None and SamplingParams().sample(0).n == 1
    with pytest.raises(ValueError, match=r"sample index must be in \[0, n=3\)"):
        p.sample(3)
    with pytest.raises(ValueError, match=r"seed must be None or an integer in \[0, 2\*\*63 - n\]"):
        SamplingParams(n=2, seed=2**63 - 1)


def test_stop_string_becomes_a_list():
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]


def test_greedy_and_penalty_flags():
    assert SamplingParams(temperature=0).greedy and SamplingParams(top_k=1).greedy
    assert not SamplingParams(temperature=0.7, top_k=2).greedy
    assert not SamplingParams().needs_penalties
    for kw in ({"presence_penalty": 0.1}, {"frequency_penalty": -0.1}, {"repetition_penalty": 1.1}):
        assert SamplingParams(**kw).needs_penalties


def test_broadcast():
    assert len(SamplingParams.broadcast(None, 3)) == 3
    p = SamplingParams(seed=1)
    assert SamplingParams.broadcast(p, 2) == [p, p]
    with pytest.raises(ValueError, match="sampling_params has 1 entries for 2 prompts"):
        SamplingParams.broadcast([p], 2)
    with pytest.raises(ValueError, match="sampling_params entries must be SamplingParams"):
        SamplingParams.broadcast([p, {}], 2)
