"""CPU startup against HF transformers' load time, for a real-size checkpoint.

Each round starts fresh processes: one builds ``LLM(model, device="cpu")`` (config, weights, the
startup step, KV sizing and allocation, tokenizer), the other runs
``AutoModelForCausalLM.from_pretrained(model)``; imports are timed apart. The goal: ours within
2x of HF's load time. Without ``--model`` a SmolLM-135M-shaped Llama with random float32 weights
is written once (30 layers, hidden 576, vocab 49,152: 134.5M parameters, 538 MB).

    python benchmarks/cpu_startup.py [--model DIR] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True,
                 rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

OURS = """
import json, time
t0 = time.perf_counter()
from engine import LLM
t1 = time.perf_counter()
llm = LLM(model={model!r}, device="cpu")
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1, "kv_blocks": llm.num_kv_blocks}}))
"""
HF = """
import json, time
t0 = time.perf_counter()
import torch, transformers
t1 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32)
t2 = time.perf_counter()
print(json.dumps({{"import": t1 - t0, "load": t2 - t1}}))
"""


def build_checkpoint(path: str) -> str:
    """A random-weight SmolLM-135M-shaped checkpoint at ``path`` (written once)."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOL_135M)).to(torch.float32)
    model.save_pretrained(path)
    return path


def _run(code: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": ROOT, "TQDM_DISABLE": "1"})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF model dir (default: a SmolLM-135M-shaped random one)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cache = os.environ.get("RUNNERS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "model-runners")
    model = args.model or build_checkpoint(os.path.join(cache, "bench-smol-135m-random"))
    ours, hf = [], []
    for _ in range(args.rounds):  # interleaved, so load on the machine hits both alike
        ours.append(_run(OURS.format(model=model)))
        hf.append(_run(HF.format(model=model)))
    o_load, h_load = statistics.median(r["load"] for r in ours), statistics.median(r["load"] for r in hf)
    o_imp, h_imp = statistics.median(r["import"] for r in ours), statistics.median(r["import"] for r in hf)
    print(f"model {model} ({os.cpu_count()} CPUs, {args.rounds} rounds, medians)")
    print(f"  ours  LLM(device='cpu')   load {o_load:6.2f} s   (+ import {o_imp:.2f} s)   "
          f"KV blocks {ours[0]['kv_blocks']}")
    print(f"  HF    from_pretrained     load {h_load:6.2f} s   (+ import {h_imp:.2f} s)")
    print(f"  ratio ours / HF           load {o_load / h_load:6.2f}x  with imports "
          f"{(o_load + o_imp) / (h_load + h_imp):.2f}x   (goal: <= 2x)")


if __name__ == "__main__":
    main()
