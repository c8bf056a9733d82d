"""TPURunner run for real through torch_xla (on XLA's CPU client with PJRT_DEVICE=CPU): the
runner conformance suite, greedy and seeded parity with the CPU runner through the engine
(chunked prefill, a prefix-cache hit), and no compilation once ``capture_model`` has run."""
import pytest

pytest.importorskip("torch_xla", reason="torch_xla is not installed (the TPU CI step's venv has it)")

import torch  # noqa: E402
import torch_xla.debug.metrics as met  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from runners.testing import RunnerConformance  # noqa: E402
from runners.tpu import TPURunner  # noqa: E402

pytestmark = pytest.mark.tpu

# The conformance suite's shapes (so both share XLA's in-process compile cache), a small
# token budget so that prompts are chunked.
ENGINE = dict(dtype="float32", block_size=16, num_kv_blocks=64, max_num_seqs=8,
              max_num_batched_tokens=32, max_model_len=256)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


class TestTPURunner(RunnerConformance):
    runner_cls = TPURunner
    device = "tpu"


def compiles() -> tuple[int, int]:
    """(XLA compilations, dynamo graphs) so far in this process."""
    from torch._dynamo.utils import counters

    data = met.metric_data("CompileTime")
    return (data[0] if data else 0), int(counters["stats"]["unique_graphs"])


@pytest.fixture(scope="module")
def engines() -> tuple[LLM, LLM]:
    return LLM(device="tpu", **ENGINE), LLM(device="cpu", **ENGINE)


def token_ids(llm: LLM, prompts: list[str], params: SamplingParams) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_runner_is_the_compiled_xla_runner(engines) -> None:
    tpu, _ = engines
    r = tpu.runner
    assert type(r) is TPURunner and r.device.type == "xla" and r.attn_backend.name == "xla"
    assert r.plan.token_buckets == (16, 32) and r.plan.req_buckets == (8,)
    assert r.kv_caches[0].device.type == "xla"


def test_greedy_matches_cpu_with_chunked_prefill_and_a_prefix_hit(engines) -> None:
    tpu, cpu = engines
    prompts = ["The capital of France is", "a", "Once upon a time, in a land far away, there lived a "
               "curious little model runner", "def fibonacci(n):\n    return"]
    assert max(len(p) for p in prompts) > ENGINE["max_num_batched_tokens"], "one prompt is chunked"
    assert token_ids(tpu, prompts, GREEDY) == token_ids(cpu, prompts, GREEDY)
    hits, bs = tpu.scheduler.kv.num_hit_tokens, ENGINE["block_size"]
    full = len(tpu.tokenizer.encode(prompts[2]).ids) // bs * bs  # prompts[2]'s cached full blocks
    shared = [prompts[2] + " who ran", prompts[2] + "!"]
    assert token_ids(tpu, shared, GREEDY) == token_ids(cpu, shared, GREEDY)
    assert full >= 3 * bs and tpu.scheduler.kv.num_hit_tokens - hits == 2 * full, "both hit the prefix"


def test_seeded_sampling_and_logprobs_match_cpu(engines) -> None:
    """The sampler runs on XLA (random paths compile on first use; searchsorted falls back)."""
    tpu, cpu = engines
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=6, seed=7, logprobs=3,
                            ignore_eos=True)
    prompts = ["hello", "seeded sampling on XLA"]
    got = tpu.generate(prompts, params, use_tqdm=False)
    want = cpu.generate(prompts, params, use_tqdm=False)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for a, b in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=1e-4, atol=1e-4)


def test_no_compilation_after_capture(engines, monkeypatch) -> None:
    tpu, cpu = engines
    seen = set()
    forward = tpu.runner._forward

    def spy(step):
        seen.add((step.input_ids.shape[0], step.md.seq_lens.shape[0], step.md.is_pure_decode))
        return forward(step)

    monkeypatch.setattr(tpu.runner, "_forward", spy)
    prompts = [("mixed workload " * k)[: 7 * k - 4] for k in range(1, 12)]  # 3..73 tokens, 11 > max_num_seqs
    params = [SamplingParams(temperature=0.0, max_tokens=4 + k % 5, ignore_eos=True) for k in range(1, 12)]
    before = compiles()
    got = [o.outputs[0].token_ids for o in tpu.generate(prompts, params, use_tqdm=False)]
    got += token_ids(tpu, ["a short one"], GREEDY)  # alone: a prefill of under 16 tokens
    assert compiles() == before, f"compiled while serving: {before} -> {compiles()}; shapes {sorted(seen)}"
    assert seen == {(16, 8, True), (16, 8, False), (32, 8, False)}, \
        "the workload reached every captured shape"
    want = [o.outputs[0].token_ids for o in cpu.generate(prompts, params, use_tqdm=False)]
    assert got == want + token_ids(cpu, ["a short one"], GREEDY)
