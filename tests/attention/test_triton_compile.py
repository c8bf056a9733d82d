"""The Triton attention kernels compile for a Hopper GPU (sm90), checked on the CPU: the interpreter
runs kernels as Python, so it accepts code a GPU compile refuses (e.g. a run-time branch that
changes a value's type). Each variant the backend launches, for bf16 and fp8 caches, goes through
Triton's compiler down to a cubin (its bundled ptxas), in a subprocess without TRITON_INTERPRET;
so does the Gluon prefill kernel (``attention.hopper_prefill``), which the interpreter cannot run."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import inspect, json, triton
    from triton.compiler import ASTSource
    from triton.backends.compiler import GPUTarget
    from attention import triton_cache_kernels as tc, triton_kernels as tk

    def compile_one(kernel, types, cons, nw, ns):
        names = list(inspect.signature(kernel.fn).parameters)
        sig = {n: "constexpr" if n in cons else types.get(n, "i32") for n in names}
        div = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig[n].startswith("*")}
        if ns is None:  # a Gluon kernel: its pipeline is written out, no stages option
            from triton.experimental.gluon._runtime import GluonASTSource
            src = GluonASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in cons.items()}, attrs=div)
            options = dict(num_warps=nw)
        else:
            src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in cons.items()}, attrs=div)
            options = dict(num_warps=nw, num_stages=ns)
        triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options)

    def attention(cache, decode, gathered, desc, split=False, cascade=False, widen=True):
        bm, bn = (16, 64) if decode else (128, 128)
        t = {"out_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": "*" + cache, "bt_ptr": "*i32", "seq_lens_ptr": "*i32",
             "qsl_ptr": "*i32", "prefix_ptr": "*i32", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
             "part_acc_ptr": "*fp32", "gfirst_ptr": "*i32", "qk_scale": "fp32"}
        t["kn_ptr"] = t["vn_ptr"] = "tensordesc<bf16[%d, 128]>" % bn if desc else "*bf16"
        g = ("tensordesc<%s[%d, 128]>" % (cache, bn) if desc else "*" + cache) if gathered else "*bf16"
        t["gk_ptr"] = t["gv_ptr"] = g
        cons = dict(Q_PER_KV=4, G_PAD=4, BLOCK_Q=1 if decode else 32, BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=128,
                    BLOCK_SIZE=16, IS_DECODE=decode, ZERO_PAD=not split, SPLIT=split, HAS_CACHE=True,
                    NEW_KV=2 if desc else 1, CASCADE=cascade, GATHERED=gathered,
                    CACHE_KV=tk.PAGED_FP8.value if cache == "fp8e4nv" and widen else tk.PAGED.value, DOT_PREC=None)
        return tk.unified_attention_kernel, t, cons, 4 if decode else 8, 2 if decode else 3

    cases = {}
    for cache in ("bf16", "fp8e4nv"):
        cases["kv_write bf16 -> " + cache] = (
            tc.kv_write_kernel, {"k_ptr": "*bf16", "v_ptr": "*bf16", "kc_ptr": "*" + cache, "vc_ptr": "*" + cache,
                                 "slot_ptr": "*i64"},
            dict(NUM_KV_HEADS=8, H_PAD=8, HEAD_DIM=128, BLOCK_SIZE=16, SAT=0.0 if cache == "bf16" else 448.0), 4, 2)
        cases["gather_pages " + cache] = (
            tc.gather_pages_kernel, {"src_ptr": "*" + cache, "dst_ptr": "*" + cache, "page_ids_ptr": "*i32",
                                     "page_rows_ptr": "*i32"},
            dict(PAGE_ELEMS=16384, ROW_ELEMS=1024, BLOCK=4096), 4, 2)
        for kv_mode in (tk.PAGED.value, tk.PAGED_FP8.value) if cache != "bf16" else (tk.PAGED.value,):
            name = "cascade_prefix " + cache + (" cast" if cache != "bf16" and kv_mode == tk.PAGED.value else "")
            cases[name] = (
                tk.cascade_prefix_kernel, {"q_ptr": "*bf16", "k_ptr": "*" + cache, "bt_ptr": "*i32",
                                           "qsl_ptr": "*i32", "prefix_ptr": "*i32", "part_m_ptr": "*fp32",
                                           "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "qk_scale": "fp32"},
                dict(Q_PER_KV=4, G_PAD=4, BLOCK_R=32, BLOCK_M=128, BLOCK_N=64, KEY_TILE=64, HEAD_DIM=128,
                     BLOCK_SIZE=16, CACHE_KV=kv_mode, DOT_PREC=None), 8, 3)
        cases["decode " + cache] = attention(cache, True, False, False)
        cases["decode split " + cache] = attention(cache, True, False, False, split=True)
        if cache != "bf16":  # fp8 widened by a cast (queries other than bf16)
            cases["decode cast " + cache] = attention(cache, True, False, False, widen=False)
        cases["decode cascade " + cache] = attention(cache, True, False, False, cascade=True)
        cases["prefill paged desc " + cache] = attention(cache, False, False, True)
        cases["prefill gathered desc " + cache] = attention(cache, False, True, True)
        cases["prefill gathered rows split " + cache] = attention(cache, False, True, False, split=True)
    cases["split_reduce"] = (tk.split_reduce_kernel, {"out_ptr": "*bf16", "part_m_ptr": "*fp32", "part_l_ptr": "*fp32",
                                                      "part_acc_ptr": "*fp32", "qsl_ptr": "*i32"},
                             dict(HEAD_DIM=128, S_PAD=64), 4, 2)
    from attention import hopper_prefill as hp
    if hp.gluon is not None:  # the Gluon prefill blocks (sm90), without and with a gathered prefix
        from triton.experimental.gluon import language as gl
        lay = gl.NVMMASharedLayout.get_default_for([hp.TILE.block_n, 128], gl.bfloat16)
        desc = "tensordesc<bf16[%d, 128],%r>" % (hp.TILE.block_n, lay)
        types = {"out_ptr": "*bf16", "q_ptr": "*bf16", "kn_desc": desc, "vn_desc": desc, "gk_desc": desc,
                 "gv_desc": desc, "gfirst_ptr": "*i32", "seq_lens_ptr": "*i32", "qsl_ptr": "*i32", "qk_scale": "fp32"}
        for gathered in (False, True):
            cases["gluon prefill gathered=%s" % gathered] = (hp.hopper_prefill_kernel, types, dict(
                Q_PER_KV=4, G_PAD=4, BLOCK_Q=32, BLOCK_M=hp.BLOCK_M, BLOCK_N=hp.TILE.block_n, HEAD_DIM=128,
                BLOCK_SIZE=16, HAS_CACHE=True, GATHERED=gathered, ZERO_PAD=True, STAGES=hp.TILE.stages),
                4, None)
    failed = {}
    for name, (kernel, types, cons, nw, ns) in cases.items():
        try:
            compile_one(kernel, types, cons, nw, ns)
        except Exception as e:  # noqa: BLE001 - reported per case
            failed[name] = type(e).__name__ + ": " + str(e)[:600]
    print(json.dumps({"cases": len(cases), "failed": failed}))
''')


@pytest.mark.cpu
def test_attention_kernels_compile_for_hopper():
    import json

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                         timeout=900)
    if out.returncode != 0 and ("ptxas" in out.stderr or "No module named 'triton.backends.nvidia'" in out.stderr):
        pytest.skip(f"this triton cannot compile for NVIDIA here: {out.stderr.strip().splitlines()[-1][:200]}")
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cases"] >= 23 and not res["failed"], res["failed"]
