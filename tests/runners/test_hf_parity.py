"""The whole stack (LLM -> scheduler -> CPURunner -> model) against HF transformers:
greedy generation token for token, and the logits of every generated step to 1e-4."""
import pytest
import torch

from engine import LLM, SamplingParams
from tests.hf_models import FAMILIES, _hf_model, cached_hf_model

PROMPT_LENS = (3, 11, 17, 30, 45)
MAX_TOKENS = 12


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in PROMPT_LENS]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_and_logits_match_hf(family, tmp_path_factory):
    model_dir = cached_hf_model(family, tmp_path_factory)
    llm = LLM(model=model_dir, device="cpu", dtype="float32", block_size=16, num_kv_blocks=64, max_model_len=128)
    recorded: list[torch.Tensor] = []
    compute_logits = llm.runner.model.compute_logits
    llm.runner.model.compute_logits = lambda h: recorded.append(compute_logits(h)) or recorded[-1]
    execute = llm.runner.execute_model
    steps: list[tuple[list[str], object]] = []

    def spy(so):
        n = len(recorded)
        out = execute(so)
        sampled = [r for r, t in zip(out.req_ids, out.sampled_token_ids) if t]
        steps.append((sampled, recorded[-1] if len(recorded) > n else None))
        return out

    llm.runner.execute_model = spy
    prompts = _prompts(hash(family) % 1000)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))

    hf = _hf_model(model_dir)
    hf.generation_config.eos_token_id = None  # ignore_eos, like ours
    ours_logits: dict[str, list[torch.Tensor]] = {o.request_id: [] for o in outs}
    for ids, logits in steps:
        for i, rid in enumerate(ids):
            ours_logits[rid].append(logits[i])
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref, f"{family}: prompt of {len(prompt)} tokens diverged"
        with torch.no_grad():
            full = hf(torch.tensor([prompt + ref[:-1]])).logits[0, len(prompt) - 1:]
        ours = torch.stack(ours_logits[out.request_id])
        assert ours.shape == full.shape
        torch.testing.assert_close(ours, full, atol=1e-4, rtol=0)
