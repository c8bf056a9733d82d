"""The Triton backend's start-up warm-up on a CUDA GPU: after the first forward with a cache (the
runner's warm-up step), prefill and mixed steps launch no JIT compile. Each case runs in a fresh
process with an empty Triton cache, so nothing compiled earlier can hide a compile; a backend
without the warm-up is timed the same way, to show that a compile would be caught."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from attention.triton_attn import TritonAttentionBackend

pytestmark = pytest.mark.gpu
WHY = ("needs a CUDA GPU" if not torch.cuda.is_available() else
       TritonAttentionBackend.unsupported_reason("cuda", torch.bfloat16, 128, 16))
if WHY:
    pytest.skip(f"triton backend: {WHY}", allow_module_level=True)

# (q_lens, cached) per step after the warm-up: a prefill chunk over a prefix, a mixed step,
# a long prompt, a short one (small query blocks), long chunks over long prefixes (gathered),
# and a short chunk over a prefix read page by page beside a long prompt (no split: on sm90 the
# unified kernel's variant the Gluon kernel otherwise keeps out of the warm-up; the mixed
# workload's chunk boundaries make such steps)
SCRIPT = textwrap.dedent("""
    import json, sys, time
    import torch
    from attention.triton_attn import TritonAttentionBackend
    from tests.attention.batch_utils import make_batch

    lens = json.loads(sys.argv[2])
    cls = TritonAttentionBackend if sys.argv[1] == "warm" else type(
        "Cold", (TritonAttentionBackend,), {"WARM_UP_QUERY_LENS": ()})
    be = cls(32, 8, 128, 128 ** -0.5)
    kw = dict(num_heads=32, num_kv_heads=8, head_dim=128, device="cuda", dtype=torch.bfloat16)
    b = make_batch([1] * 4, [100, 7, 300, 2000], **kw)  # the warm-up step: decode rows
    be(b.q, b.k, b.v, b.kv_cache, b.md)
    torch.cuda.synchronize()
    times = []
    for q_lens, ctx in lens:
        b = make_batch(q_lens, ctx, **kw)
        t = time.perf_counter()
        be(b.q, b.k, b.v, b.kv_cache, b.md)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    print(json.dumps(times))
""")
STEPS = [([300], [100]), ([1, 1, 1, 200, 1], [50, 900, 7, 0, 4000]), ([3000], [0]), ([5, 9], [40, 0]),
         ([2048], [8192]), ([1, 160], [30, 3000]), ([20, 3000], [500, 0])]
LIMIT_S = 0.3  # a launch of these shapes takes well under a millisecond; a compile takes seconds


def _first_step_times(mode: str, tmp_path) -> list[float]:
    cache = tmp_path / mode
    env = dict(os.environ, TRITON_CACHE_DIR=str(cache))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode, json.dumps(STEPS)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_compile_after_the_warm_up_step(tmp_path) -> None:
    warm = _first_step_times("warm", tmp_path)
    assert max(warm) < LIMIT_S, f"a step after the warm-up took {warm} s: a kernel variant was compiled late"
    cold = _first_step_times("cold", tmp_path)  # the control: without the warm-up, compiles land here
    assert max(cold) > LIMIT_S, f"without the warm-up no step took over {LIMIT_S} s ({cold}): the test cannot see compiles"
