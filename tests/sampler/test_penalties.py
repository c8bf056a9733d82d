"""Penalties from the state's incremental device counts against a plain reference."""
import numpy as np
import pytest
import torch

from engine.sampling_params import SamplingParams as SP
from runners.sampler import Sampler
from runners.sampling_state import SamplingState
from tests.sampler.reference import make_state, ref_penalties

pytestmark = pytest.mark.cpu

V = 50


def _random_case(n: int, seed: int):
    rng = np.random.default_rng(seed)
    params, prompts, outputs = [], [], []
    for i in range(n):
        kind = i % 4  # neutral, additive only, repetition only, all
        params.append(SP(seed=i,
                         presence_penalty=float(rng.uniform(-2, 2)) if kind in (1, 3) else 0.0,
                         frequency_penalty=float(rng.uniform(-2, 2)) if kind in (1, 3) else 0.0,
                         repetition_penalty=float(rng.uniform(0.3, 3)) if kind in (2, 3) else 1.0))
        prompts.append(rng.integers(0, V, int(rng.integers(1, 20))).tolist())
        outputs.append(rng.integers(0, V, int(rng.integers(0, 15))).tolist())
    logits = torch.from_numpy(rng.normal(0, 3, (n, V)).astype(np.float32))
    return params, prompts, outputs, logits


def _penalised(st: SamplingState, rows: np.ndarray, logits: torch.Tensor) -> torch.Tensor:
    return Sampler._apply_penalties(logits.clone(), st.prepare(rows))


def _check(params, prompts, outputs, logits, got):
    for b, p in enumerate(params):
        want = ref_penalties(logits[b].tolist(), prompts[b], outputs[b], p)
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-5, atol=1e-5)


def test_penalties_match_reference():
    params, prompts, outputs, logits = _random_case(24, seed=0)
    st, rows = make_state(params, V, prompts=prompts, outputs=outputs)
    got = _penalised(st, rows, logits)
    _check(params, prompts, outputs, logits, got)
    assert not torch.equal(got[3], logits[3])  # the reference is not a no-op
    assert torch.equal(got[0], logits[0])


def test_counts_follow_updates_and_readmission():
    params, prompts, outputs, logits = _random_case(12, seed=1)
    rows = np.array([5, 0, 9, 2, 11, 7, 1, 3, 4, 6, 8, 10])
    st, rows = make_state(params, V, prompts=prompts, outputs=outputs, rows=rows, max_reqs=16)
    history = [list(o) for o in outputs]
    for step in range(6):
        live = np.arange(12) if step % 2 == 0 else np.arange(0, 12, 3)  # not every row samples
        out = Sampler()(torch.randn(len(live), V), st.prepare(rows[live]))
        st.update(rows[live], out.sampled_token_ids)
        for b, tok in zip(live.tolist(), out.sampled_token_ids.tolist()):
            history[b].append(tok)
    pen_rows = [b for b, p in enumerate(params) if p.needs_penalties]
    for b in pen_rows:
        want = np.bincount(history[b], minlength=V)
        assert np.array_equal(st.counts[rows[b]].numpy(), want)
    assert list(st.num_generated[rows]) == [len(h) for h in history]
    _check(params, prompts, history, logits, _penalised(st, rows, logits))
    # preempt and re-admit into other rows: counts and positions are rebuilt from the tokens
    for b in range(12):
        st.remove_request(int(rows[b]))
    moved = (rows + 3) % 16
    for b, p in enumerate(params):
        st.add_request(int(moved[b]), p, prompts[b], history[b])
    _check(params, prompts, history, logits, _penalised(st, moved, logits))
    assert list(st.num_generated[moved]) == [len(h) for h in history]


def test_penalty_tensors_are_allocated_lazily():
    st = SamplingState(8, V, "cpu", 0)
    st.add_request(0, SP(), [1, 2])
    for _ in range(3):
        out = Sampler()(torch.randn(1, V), st.prepare(np.array([0])))
        st.update(np.array([0]), out.sampled_token_ids)
    assert st.counts is None and st.prompt_mask is None
    st.add_request(1, SP(presence_penalty=0.5), [1, 2])
    assert st.counts is not None and st.counts.shape == (8, V) and st.prompt_mask is None
    st.add_request(2, SP(repetition_penalty=1.2), [1, 2], [3])
    assert st.prompt_mask is not None and st.prompt_mask[2, [1, 2]].all() and not st.prompt_mask[2, 3]
    assert st.counts[2, 3] == 1


@pytest.mark.parametrize("prompt,outputs,name", [([V], [], "prompt_token_ids"),
                                                  ([1], [-1], "output_token_ids")])
def test_bad_token_ids_for_penalties(prompt, outputs, name):
    st = SamplingState(2, V, "cpu", 0)
    with pytest.raises(ValueError, match=rf"{name} must be token ids in \[0, {V}\)"):
        st.add_request(0, SP(frequency_penalty=1.0), prompt, outputs)
