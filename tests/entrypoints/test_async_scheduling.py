"""Async scheduling (step n+1 scheduled and launched before step n's output is applied) gives
token-for-token the outputs of synchronous scheduling: greedy and seeded sampling with
penalties, min_p, stop strings, stop tokens, min_tokens, logprobs, chunked prefill, few seats,
and a pool small enough to preempt."""
import pytest

from engine import LLM, SamplingParams

pytestmark = pytest.mark.cpu

PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):", "a" * 40,
           "Hello", "Numbers: 1, 2, 3,", "The quick brown fox jumps over the lazy dog. " * 2, "x"]


def _params() -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20, presence_penalty=0.5,
                       frequency_penalty=0.3, repetition_penalty=1.2, logprobs=3),
        SamplingParams(temperature=1.0, min_p=0.05, seed=11, max_tokens=30, stop=["e", "a"]),
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[101, 32, 116], min_tokens=3),
        SamplingParams(temperature=0.7, top_k=20, seed=3, max_tokens=12, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=1),
        SamplingParams(temperature=0.9, seed=5, max_tokens=25, stop=["the"], repetition_penalty=1.5),
        SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=[120], ignore_eos=True),
    ]


SETTINGS = {
    "one step": dict(max_num_batched_tokens=4096),
    "chunks of 16": dict(max_num_batched_tokens=16),
    "max_num_seqs=2": dict(max_num_seqs=2, max_num_batched_tokens=64),
    "tiny pool (preemption)": dict(num_kv_blocks=18, block_size=8, max_num_batched_tokens=32),
}


def steps_launched_ahead(llm: LLM) -> list[int]:
    """Per rank: steps its runner launched before the previous step's ids were read back."""
    if llm.config.executor_backend == "mp":
        return llm.executor._call("steps_launched_ahead")
    return [llm.runner.steps_launched_ahead]


def _run(async_scheduling: bool, **args):
    args = {"device": "cpu", **args}
    with LLM(max_model_len=256, async_scheduling=async_scheduling, **args) as llm:
        outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
        again = llm.generate(PROMPTS[:3], _params()[:3], use_tqdm=False)  # prefix hits, a second call
        stats = llm.scheduler.stats()
        assert llm.scheduler.kv.num_free_blocks == llm.num_kv_blocks - 1, "every block came back"
        if llm.config.executor_backend != "mp":
            assert not llm.runner.requests and llm.runner.input_batch.num_active == 0
        ahead = steps_launched_ahead(llm)
    # ordering, not timing: step n+1 was launched on every rank before step n's ids were read
    assert len(set(ahead)) == 1 and (ahead[0] > 0) == async_scheduling, ahead
    return [(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason, o.outputs[0].stop_reason,
             o.outputs[0].logprobs) for o in outs + again], stats


def check_async_equals_sync(name: str, **args) -> None:
    """Both modes over ``SETTINGS[name]`` (and ``args``): the same tokens, texts, reasons, logprobs."""
    sync, s_stats = _run(False, **SETTINGS[name], **args)
    asyn, a_stats = _run(True, **SETTINGS[name], **args)
    for i, (a, b) in enumerate(zip(asyn, sync)):
        assert a[:4] == b[:4], f"request {i} differs under async scheduling:\n async {a[:4]}\n sync  {b[:4]}"
        # logprobs: the same tokens and ranks; values to float32 rounding (a step's batch may hold
        # one more row under async scheduling, and CPU matmuls round by shape)
        assert (a[4] is None) == (b[4] is None)
        for x, y in zip(a[4] or [], b[4] or []):
            assert x.token_ids == y.token_ids and x.sampled_rank == y.sampled_rank
            assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    reasons = {r[2] for r in sync}
    assert {"stop", "length"} <= reasons, reasons  # stop strings/tokens and max_tokens both happened
    if name == "tiny pool (preemption)":
        assert a_stats.num_preemptions > 0 and s_stats.num_preemptions > 0


@pytest.mark.parametrize("name", SETTINGS)
def test_async_equals_sync(name):
    check_async_equals_sync(name)


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_async_equals_sync_on_the_gpu(enforce_eager):
    """On a GPU the next step is built while the device still runs this one (staging buffers by
    turns, ids read back behind an event), with decode CUDA graphs or eager."""
    args = dict(device="cuda", dtype="float32", max_num_batched_tokens=64, enforce_eager=enforce_eager,
                attention_backend="triton")
    sync, _ = _run(False, **args)
    asyn, _ = _run(True, **args)
    assert [a[:4] for a in asyn] == [s[:4] for s in sync]


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_launching_ahead_does_not_wait_for_the_device(enforce_eager):
    """The step launched while the previous one runs takes that one's ids on the device without
    waiting for it: with the device held busy (a long sleep kernel queued after step 1), step 2
    is built, its pending ids scattered and its forward launched while the device is still busy
    (a read-back or a synchronising upload anywhere on that path would drain the stream first)."""
    import torch

    from engine.request import Request

    with LLM(device="cuda", dtype="float32", max_model_len=256, async_scheduling=True, enforce_eager=enforce_eager,
             attention_backend="triton") as llm:
        params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        prompts = [list(range(10 + i, 30 + i)) for i in range(4)]
        llm.generate(prompts, params, use_tqdm=False)  # first launches load kernels (that may synchronise)
        sched, runner = llm.scheduler, llm.runner
        for i, p in enumerate(prompts):
            sched.add_request(Request(f"r{i}", p, params))
        so1 = sched.schedule()
        first = runner.execute_model_async(so1)
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000_000)  # about a second of device time before step 1's ids are read
        ahead = runner.steps_launched_ahead
        so2 = sched.schedule()
        second = runner.execute_model_async(so2)
        still_busy = not torch.cuda.current_stream().query()
        assert runner.steps_launched_ahead == ahead + 1  # step 2 took step 1's ids on the device
        assert still_busy, "launching step 2 waited for the device"
        out2 = second.result()  # control: reading step 2 back waits out the sleep queued before it
        assert torch.cuda.current_stream().query()  # (what the check above would see after a wait)
        sched.update_from_output(so1, first.result())
        sched.update_from_output(so2, out2)
        assert all(len(r.output_token_ids) == 2 for r in sched.running)


@pytest.mark.parametrize("point", ["first prefill step", "decode", "detokenization"])
def test_ctrl_c_under_async_scheduling_loses_nothing(point, monkeypatch):
    """Both steps in flight are discarded; the pool is whole and the next call is a fresh object's."""
    import signal

    from tests.entrypoints import test_llm_interrupts as t

    engine = {**t.ENGINE, "async_scheduling": True}
    with LLM(**engine) as fresh:
        reference = t._view(fresh.generate(t._prompts(), t.PARAMS, use_tqdm=False))
    llm = LLM(**engine)
    old = signal.signal(signal.SIGALRM, signal.default_int_handler)
    undo = t.POINTS[point](llm, monkeypatch)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.generate(t._prompts(), t.PARAMS, use_tqdm=False)
    finally:
        undo()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    t.assert_whole(llm)
    assert t._view(llm.generate(t._prompts(), t.PARAMS, use_tqdm=False)) == reference
    t.assert_whole(llm)
    llm.shutdown()


def test_async_equals_sync_with_n_samples_and_prompt_logprobs():
    params = [SamplingParams(n=3, temperature=0.9, seed=4, max_tokens=12, logprobs=2, prompt_logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=8, stop=["e"])]
    got = {}
    for mode in (False, True):
        with LLM(device="cpu", max_model_len=256, max_num_batched_tokens=16, async_scheduling=mode) as llm:
            outs = llm.generate(PROMPTS[:2], params, use_tqdm=False)
        got[mode] = [([c.token_ids for c in o.outputs], [c.text for c in o.outputs],
                      [[sorted(d) for d in c.logprobs or []] for c in o.outputs],
                      [sorted(d) if d else d for d in (o.prompt_logprobs or [])]) for o in outs]
    assert got[True] == got[False]
    assert len(got[True][0][0]) == 3 and len(set(map(tuple, got[True][0][0]))) > 1, "three distinct samples"
