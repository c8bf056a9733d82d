"""The sampler on an accelerator: same semantics as on the CPU, batch-invariant there too."""
import numpy as np
import pytest
import torch

from engine.sampling_params import SamplingParams as SP
from tests.sampler.reference import chi2_critical, chi2_stat, make_state, ref_penalties, ref_probs, sample
from tests.sampler.test_sampler import MIXED
from runners.sampler import Sampler

HAVE_ACCEL = torch.accelerator.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAVE_ACCEL, reason="needs an accelerator")]
DEV = str(torch.accelerator.current_accelerator()) if HAVE_ACCEL else "cpu"
V = 32000


def _logits(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_and_degenerate_filters():
    logits = _logits(64, 0)
    for kw in (dict(temperature=0.0), dict(top_k=1, temperature=2.0), dict(top_p=1e-6)):
        out = sample([SP(seed=i, **kw) for i in range(64)], logits, device=DEV)
        assert out.sampled_token_ids.device.type == DEV
        assert torch.equal(out.sampled_token_ids.cpu(), logits.argmax(-1))


def test_batch_invariance_and_cpu_agreement():
    logits = _logits(len(MIXED), 1)
    outs = [[3, 3, i] for i in range(len(MIXED))]
    alone = [int(sample([p], logits[i:i + 1], outputs=[outs[i]], device=DEV).sampled_token_ids)
             for i, p in enumerate(MIXED)]
    rng = np.random.default_rng(0)
    for trial in range(4):
        extra = int(rng.integers(1, 200))
        params = list(MIXED) + [SP(top_p=0.9, seed=1000 + j) for j in range(extra)]
        perm = rng.permutation(len(params))
        big = torch.cat([logits, _logits(extra, 10 + trial)])[perm]
        got = sample([params[i] for i in perm], big, outputs=[(outs + [[]] * extra)[i] for i in perm],
                     device=DEV).sampled_token_ids.cpu()
        assert [int(got[np.flatnonzero(perm == i)[0]]) for i in range(len(MIXED))] == alone
    cpu = sample(MIXED, logits, outputs=outs).sampled_token_ids.tolist()
    assert cpu == alone


def test_statistics_on_device():
    logits = torch.tensor([1.2, -0.3, 2.1, 0.4, 0.9, -1.5, 1.9, 0.0, -0.7, 1.4, 0.2, -2.2])
    n = 20000
    for kw in (dict(temperature=0.7), dict(top_k=4), dict(top_p=0.8), dict(min_p=0.2, temperature=1.3)):
        out = sample([SP(seed=7 * i + 1, **kw) for i in range(n)], logits.expand(n, -1), device=DEV)
        counts = np.bincount(out.sampled_token_ids.cpu().numpy(), minlength=12)
        stat, df = chi2_stat(counts, ref_probs(logits.tolist(), SP(**kw)), n)
        assert stat < chi2_critical(df), kw


def test_penalties_and_logprobs_on_device():
    rng = np.random.default_rng(3)
    params = [SP(seed=i, presence_penalty=0.7, frequency_penalty=-0.4, repetition_penalty=1.6, logprobs=4)
              for i in range(8)]
    prompts = [rng.integers(0, V, 30).tolist() for _ in params]
    outputs = [rng.integers(0, 50, 20).tolist() for _ in params]
    logits = _logits(8, 4)
    st, rows = make_state(params, V, prompts=prompts, outputs=outputs, device=DEV)
    md = st.prepare(rows)
    got = Sampler._apply_penalties(logits.to(DEV, copy=True), md).cpu()
    for b, p in enumerate(params):
        np.testing.assert_allclose(got[b].numpy(), ref_penalties(logits[b].tolist(), prompts[b], outputs[b], p),
                                   rtol=1e-5, atol=1e-5)
    out = Sampler()(logits.to(DEV, copy=True), st.prepare(rows))
    ref = torch.log_softmax(logits.double(), -1)
    for b, lp in enumerate(out.logprobs.to_lists()):
        np.testing.assert_allclose(lp.logprobs, ref[b, lp.token_ids].numpy(), atol=1e-4)
        assert lp.token_ids[1:] == ref[b].argsort(descending=True)[:4].tolist()


def test_seeded_end_to_end_on_device():
    from engine import LLM
    from tests.sampler.test_seeded_e2e import PARAMS, PROMPTS, SEEDED

    def run(num_kv_blocks=64, **kw):  # a fixed small pool: the engines share the device
        llm = LLM(model=None, device=DEV, dtype="float32", max_num_seqs=8, seed=0,
                  attention_backend="torch", num_kv_blocks=num_kv_blocks, **kw)
        tokens = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]
        alone = {i: llm.generate([PROMPTS[i]], [PARAMS[i]], use_tqdm=False)[0].outputs[0].token_ids
                 for i in SEEDED} if not kw else {}
        return tokens, alone, llm.scheduler.num_preemptions
    together, alone, _ = run()
    assert all(alone[i] == together[i] for i in SEEDED)
    assert run(max_num_batched_tokens=7)[0] == together
    got, _, preemptions = run(num_kv_blocks=5, max_num_batched_tokens=7)
    assert preemptions > 0 and got == together
