"""``python -m runners generate`` (also ``python -m entrypoints`` and ``model-runners``): run the
offline engine and print completions and a summary."""
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
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch step n+1 while step n runs (default: on for CUDA, else off)")
    g.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel ranks (one process each; default 1)")
    g.add_argument("--distributed-executor-backend", default=None, choices=["uni", "mp", "external_launcher"],
                   help="how ranks run (default: uni for one rank, mp for several)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors are one line on stderr (exit 2), Ctrl-C exits 130, neither with a traceback."""
    args = _parser().parse_args(argv)
    from engine import SamplingParams
    from entrypoints.llm import LLM

    try:
        llm = LLM(model=args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                  attention_backend=args.attention_backend, num_kv_blocks=args.num_kv_blocks,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                  async_scheduling=args.async_scheduling,
                  tensor_parallel_size=args.tp, distributed_executor_backend=args.distributed_executor_backend)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - reported in one line
        return _fail(e)
    try:
        params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens, seed=args.seed)
        _print(llm, llm.generate(args.prompt or DEFAULT_PROMPTS, params))
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        return _fail(e)
    finally:
        llm.shutdown()
    return 0


def _fail(e: BaseException) -> int:
    if isinstance(e, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    lines = str(e).strip().splitlines()  # a worker's error carries its traceback after the first line
    what = lines[0] if lines else ""
    if not isinstance(e, (ValueError, RuntimeError, OSError, TypeError)):
        what = f"{type(e).__name__}: {what}"
    print(f"error: {what}", file=sys.stderr)
    return 2


def _print(llm: "LLM", outputs: list) -> None:
    for out in outputs:
        comp = out.outputs[0]
        print(f"--- {out.prompt!r} ({len(out.prompt_token_ids)} tokens)")
        print(f"{comp.text!r}  [{len(comp.token_ids)} tokens, finish={comp.finish_reason}]")
    i, s = llm.info, llm.stats
    tp = f", tensor parallel x{i.tensor_parallel_size} ({llm.config.executor_backend}, all-reduce: " \
        f"{i.all_reduce})" if i.tensor_parallel_size > 1 else ""
    print("\nsummary")
    print(f"  device            {i.device} ({i.platform}){tp}")
    print(f"  runner            {i.runner}")
    print(f"  attention backend {i.attention_backend}")
    print(f"  async scheduling  {'on' if llm.config.async_scheduling else 'off'}")
    print(f"  model             {llm.config.model} ({i.dtype})")
    print(f"  KV blocks         {llm.num_kv_blocks} x {llm.config.block_size} tokens" +
          (" per rank" if i.tensor_parallel_size > 1 else ""))
    print(f"  prefill           {s.prefill_tokens} tokens, {s.prefill_tps:,.0f} tokens/s")
    print(f"  decode            {s.decode_tokens} tokens, {s.decode_tps:,.0f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
