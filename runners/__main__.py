"""``python -m runners generate``: run the offline engine and print completions and a summary."""
from __future__ import annotations

import argparse
import sys

DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m runners", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate completions for prompts")
    g.add_argument("--model", default=None, help="HF model directory (default: the embedded tiny Llama)")
    g.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--device", default=None, help="cpu, cuda, xpu, tpu (default: detected)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--attention-backend", default=None)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=8192)
    g.add_argument("--enforce-eager", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from engine import LLM, SamplingParams

    try:
        llm = LLM(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                  attention_backend=args.attention_backend, num_kv_blocks=args.num_kv_blocks,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager)
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
        prompts = args.prompt or DEFAULT_PROMPTS
        outputs = llm.generate(prompts, params)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for out in outputs:
        comp = out.outputs[0]
        print(f"--- {out.prompt!r} ({len(out.prompt_token_ids)} tokens)")
        print(f"{comp.text!r}  [{len(comp.token_ids)} tokens, finish={comp.finish_reason}]")
    r, s = llm.runner, llm.stats
    print("\nsummary")
    print(f"  device            {r.device} ({r.platform.name})")
    print(f"  runner            {type(r).__name__}")
    print(f"  attention backend {r.attn_backend.name}")
    print(f"  model             {r.config.model} ({r.dtype})")
    print(f"  KV blocks         {llm.num_kv_blocks} x {r.block_size} tokens")
    print(f"  prefill           {s.prefill_tokens} tokens, {s.prefill_tps:,.0f} tokens/s")
    print(f"  decode            {s.decode_tokens} tokens, {s.decode_tps:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
