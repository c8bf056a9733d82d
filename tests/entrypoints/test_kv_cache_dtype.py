"""``kv_cache_dtype="fp8"``: an fp8 (e4m3) KV cache through the engine, on the CPU (the torch
backend, and Triton under its interpreter): twice the blocks for the same bytes, the same
tokens from both backends, and clear refusals."""
from __future__ import annotations

import pytest
import torch

from attention.backend import AttentionBackend
from attention.composite import composite_backend
from attention.selector import get_attn_backend
from attention.torch_ref import TorchAttentionBackend
from engine import LLM, SamplingParams
from engine.config import EngineConfig

PROMPT = list(range(5, 45))


def _run(backend: str, kv_cache_dtype: str, device: str = "cpu") -> tuple[list[float], list[int], int, str]:
    """Prompt logprobs of PROMPT's tokens (chunks of 16: later chunks attend to the cached, stored
    K/V of earlier ones), 8 greedy tokens, the KV blocks in 1 MiB, the reported cache dtype."""
    with LLM(device=device, dtype="float32", max_model_len=256, kv_cache_memory_bytes=2**20,
             attention_backend=backend, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=16) as llm:
        out, = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                     prompt_logprobs=1), use_tqdm=False)
        lps = [out.prompt_logprobs[t][PROMPT[t]].logprob for t in range(1, len(PROMPT))]
        return lps, out.outputs[0].token_ids, llm.num_kv_blocks, llm.info.kv_cache_dtype


def _max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.cpu
def test_fp8_cache_doubles_the_blocks_and_stays_close():
    """The torch backend: 4x the blocks of the CPU's float32 cache in the same bytes, prompt
    logprobs within 0.5 nats of float32's (e4m3 keeps 3 mantissa bits: 0.23 here; zeroed or
    misplaced K/V move them by several nats), and the first greedy token the same."""
    ref, ref_toks, blocks, dtype = _run("torch", "auto")
    fp8, fp8_toks, blocks8, dtype8 = _run("torch", "fp8")
    assert (dtype, dtype8) == ("float32", "float8_e4m3fn")
    assert blocks8 == 4 * blocks
    assert 0 < _max_diff(fp8, ref) < 0.5
    assert fp8_toks[0] == ref_toks[0]


@pytest.mark.cpu
def test_fp8_cache_with_triton_under_the_interpreter():
    """Triton's fp8 path runs end to end on the CPU. Its numbers are not compared here: the
    Triton interpreter (3.x) rounds float32 -> e4m3 wrongly where rounding carries into the
    exponent (1.97 -> 1.0), which GPUs do not; ``test_fp8_cache_triton_equals_torch_gpu``
    compares them on a GPU, and the kernel tests use fp8-representable K/V."""
    lps, toks, blocks8, dtype8 = _run("triton", "fp8_e4m3")
    assert dtype8 == "float8_e4m3fn" and len(toks) == 8 and len(lps) == len(PROMPT) - 1
    assert blocks8 == _run("torch", "fp8")[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_cache_triton_equals_torch_gpu():
    """On a GPU (hardware rounding) the Triton and torch backends store the same fp8 bytes and
    read them alike: prompt logprobs agree to float32 rounding, and the greedy tokens match."""
    a, a_toks, _, _ = _run("triton", "fp8", "cuda")
    b, b_toks, _, _ = _run("torch", "fp8", "cuda")
    assert _max_diff(a, b) < 1e-3 and a_toks == b_toks


@pytest.mark.cpu
def test_fp8_cache_refusals_name_the_problem():
    with pytest.raises(ValueError, match=r"kv_cache_dtype must be one of \('auto', 'fp8', 'fp8_e4m3'\), got 'int8'"):
        EngineConfig(kv_cache_dtype="int8")
    fp8 = torch.float8_e4m3fn
    assert _Plain.kv_cache_dtype_reason(torch.float32, torch.float32, "cpu") is None
    assert "model's dtype" in _Plain.kv_cache_dtype_reason(fp8, torch.float32, "cpu")
    mixed = composite_backend(TorchAttentionBackend, _Plain)
    assert mixed.kv_cache_dtype_reason(fp8, torch.float32, "cpu").startswith("its prefill backend 'plain_test'")
    assert composite_backend(TorchAttentionBackend, TorchAttentionBackend).kv_cache_dtype_reason(
        fp8, torch.float32, "cpu") is None
    with pytest.raises(RuntimeError, match="attention backend 'xla' cannot run here"):
        get_attn_backend("xla", "cpu", torch.float32, 64, 16, kv_cache_dtype=fp8)
    # without an explicit choice the platform's preference skips a backend that cannot hold fp8
    import attention.selector as sel
    sel.register_backend("plain_test", f"{__name__}:_Plain")
    try:
        chosen = get_attn_backend(None, "cpu", torch.float32, 64, 16, ("plain_test", "torch"), fp8)
        assert chosen is TorchAttentionBackend
        assert get_attn_backend(None, "cpu", torch.float32, 64, 16, ("plain_test", "torch")) is _Plain
    finally:
        sel._REGISTRY.pop("plain_test")


class _Plain(AttentionBackend):
    """A backend that keeps K/V in the model's dtype only (the base class's default)."""

    name = "plain_test"

    def forward(self, q, k, v, kv_cache, md):  # pragma: no cover - never run
        raise AssertionError
