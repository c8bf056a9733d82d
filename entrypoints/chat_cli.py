"""``python -m runners chat``: an interactive conversation in a terminal (or over a pipe).

Each line typed is a user message; the reply streams to stdout as it is generated and joins the
conversation. ``/reset`` clears it (the system message stays), Ctrl-C stops a reply (the unanswered
message is dropped), Ctrl-D or ``/exit`` quits.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from entrypoints.llm import LLM

PROMPT = "> "


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def chat_loop(llm: "LLM", args: argparse.Namespace, params: SamplingParams) -> int:
    """Run the conversation until EOF or /exit; returns the exit status (0)."""
    from entrypoints.cli import chat_template_arg

    template = llm.get_chat_template(chat_template_arg(args.chat_template))  # fail before the first prompt
    system: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    conversation = list(system)
    print(f"chat with {llm.config.model} on {llm.info.device}: /reset clears the conversation, Ctrl-C stops "
          f"a reply, Ctrl-D or /exit quits", flush=True)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            conversation = list(system)
            print("(conversation cleared)")
            continue
        conversation.append({"role": "user", "content": line})
        try:
            out = llm.chat(conversation, params, use_tqdm=False, chat_template=template.source,
                           on_text=lambda _p, _s, piece: _write(piece))[0].outputs[0]
        except KeyboardInterrupt:
            conversation.pop()
            print("\n(reply stopped)", flush=True)
            continue
        except ValueError as e:  # e.g. the conversation outgrew max_model_len
            conversation.pop()
            print(f"error: {e} (/reset starts over)", file=sys.stderr, flush=True)
            continue
        note = "  (cut at --max-tokens)" if out.finish_reason == "length" else ""
        print(note, flush=True)
        conversation.append({"role": "assistant", "content": out.text})
