"""SamplingState: seeds, positions, row bookkeeping and the per-step metadata."""
import numpy as np
import pytest
import torch

from engine.sampling_params import SamplingParams as SP
from runners.sampler import Sampler
from runners.sampling_state import SamplingState, uniform_noise

pytestmark = pytest.mark.cpu

V = 40


def test_seed_choice():
    st = SamplingState(4, V, "cpu", seed=0)
    assert st.add_request(0, SP(seed=123), [1]) == 123
    assert st.add_request(1, SP(seed=123), [1], seed=9) == 123  # the request's own seed wins
    assert st.add_request(2, SP(), [1], seed=9) == 9  # passed back after preemption
    drawn = st.add_request(3, SP(), [1])
    assert 0 <= drawn < 2**63


def test_unseeded_requests_are_reproducible_per_engine_seed():
    def draws(engine_seed):
        st = SamplingState(4, V, "cpu", seed=engine_seed)
        return [st.add_request(i, SP(), [1]) for i in range(4)]
    assert draws(0) == draws(0)
    assert draws(0) != draws(1)
    assert len(set(draws(0))) == 4


def test_uniform_noise():
    u = uniform_noise(np.arange(10000), np.zeros(10000))
    assert u.dtype == np.float32 and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    # depends only on (seed, position): elementwise, whatever the other entries
    assert uniform_noise(np.array([7, 3]), np.array([5, 0]))[0] == uniform_noise(np.array([7]), np.array([5]))[0]
    assert uniform_noise(np.array([7]), np.array([5])) != uniform_noise(np.array([7]), np.array([6]))
    assert uniform_noise(np.array([2**63 - 1]), np.array([0]))[0] < 1


def test_readmission_resumes_the_stream():
    """Generating 5 tokens, or being preempted after 3 and re-added with them, draws alike."""
    logits = torch.randn(1, V) / 3
    st = SamplingState(4, V, "cpu", seed=0)
    seed = st.add_request(0, SP(), [1, 2])
    tokens = []
    for _ in range(5):
        out = Sampler()(logits.clone(), st.prepare(np.array([0])))
        st.update(np.array([0]), out.sampled_token_ids)
        tokens.append(int(out.sampled_token_ids))
    st2 = SamplingState(4, V, "cpu", seed=99)  # a different engine seed: the request keeps its own
    st2.add_request(3, SP(), [1, 2], tokens[:3], seed=seed)
    again = []
    for _ in range(2):
        out = Sampler()(logits.clone(), st2.prepare(np.array([3])))
        st2.update(np.array([3]), out.sampled_token_ids)
        again.append(int(out.sampled_token_ids))
    assert again == tokens[3:]
    assert len(set(tokens)) > 1


def test_prepare_checks_rows():
    st = SamplingState(4, V, "cpu", seed=0)
    st.add_request(1, SP(), [1])
    with pytest.raises(ValueError, match=r"rows must be active rows in \[0, 4\)"):
        st.prepare(np.array([0]))
    with pytest.raises(ValueError, match=r"rows must be active rows"):
        st.prepare(np.array([4]))
    st.remove_request(1)
    with pytest.raises(ValueError, match=r"rows must be active rows"):
        st.prepare(np.array([1]))
    with pytest.raises(ValueError, match=r"row must be in \[0, 4\)"):
        st.add_request(4, SP(), [1])


def test_grouping_flags_come_from_host():
    st = SamplingState(8, V, "cpu", seed=0, num_candidates=16)
    for i, p in enumerate([SP(temperature=0), SP(top_k=5), SP(top_k=20), SP(top_k=-1, top_p=0.5),
                           SP(top_k=V + 5, min_p=0.2), SP(top_k=1, temperature=3.0)]):
        st.add_request(i, p, [1])
    md = st.prepare(np.arange(6))
    assert md.num_greedy == 2 and not md.all_greedy
    assert md.candidates.idx.tolist() == [1] and md.candidates.max_top_k == 5
    assert md.full.idx.tolist() == [2, 3, 4] and md.full.any_top_p and md.full.max_top_k == 20
    assert md.full.top_k.flatten().tolist() == [20, 0, 0]  # top_k -1 and >= vocab are off
    assert md.penalties is None and md.min_tokens_flat is None and md.logprobs is None
    greedy = st.prepare(np.array([0, 5]))
    assert greedy.all_greedy and greedy.candidates is None and greedy.full is None


def test_min_tokens_indices():
    st = SamplingState(4, V, "cpu", seed=0, eos_token_ids=(2, V + 1))  # ids outside the vocab are dropped
    st.add_request(0, SP(min_tokens=2, stop_token_ids=[5, 9]), [1])
    st.add_request(1, SP(min_tokens=2, ignore_eos=True, stop_token_ids=[6]), [1], [3])
    st.add_request(2, SP(min_tokens=1), [1], [3])  # already has its min_tokens
    md = st.prepare(np.array([2, 0, 1]))
    assert sorted(md.min_tokens_flat.tolist()) == [V + 2, V + 5, V + 9, 2 * V + 6]


def test_prepare_dummy_runs_the_costly_path():
    st = SamplingState(8, V, "cpu", seed=0)
    md = st.prepare_dummy(6)
    assert md.full is not None and md.full.any_top_p and md.logprobs.max_num == 20
    out = Sampler()(torch.randn(6, V), md)
    assert out.sampled_token_ids.shape == (6,) and out.logprobs.token_ids.shape == (6, 21)
    assert not st.active.any()
