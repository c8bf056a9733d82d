"""Chat templates: a conversation -> prompt text, rendered with jinja2 as HF tokenizers do.

A checkpoint directory carries its template in ``chat_template.jinja``, ``chat_template.json`` or
``tokenizer_config.json`` (``"chat_template"``: a string, or a list of named templates of which
``"default"`` is used); a GGUF file in its ``tokenizer.chat_template`` metadata. Templates run
in jinja2's immutable sandbox with HF's environment: ``trim_blocks``, ``lstrip_blocks``, the
``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a ``tojson`` filter that
keeps non-ASCII text. The rendered text already holds the special tokens it needs, so it is
tokenized without adding any (no second BOS).
"""
from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any, Mapping, Sequence

Message = Mapping[str, Any]
Conversation = Sequence[Message]


class ChatTemplate:
    """A compiled template plus the special-token strings it may refer to (``bos_token``...)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str | None] | None = None) -> None:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"a chat template must be a non-empty string, got {source!r}")

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
                   separators: Any = None, sort_keys: bool = False) -> str:
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the chat template does not compile: {e} (line {e.lineno})") from e
        self.source = source
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}

    def render(self, messages: Conversation, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text of one conversation (a list of ``{"role": ..., "content": ...}``);
        ``kwargs`` reach the template (e.g. ``tools``). ValueError names a template's complaint."""
        import jinja2

        check_conversation(messages)
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused the conversation: {e}") from e


def check_conversation(messages: Any, index: int | None = None) -> None:
    """TypeError/ValueError unless ``messages`` is a non-empty list of dicts with a str ``role``."""
    where = f"conversation {index}" if index is not None else "conversation"
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise TypeError(f"{where}: expected a non-empty list of messages ({{'role': ..., 'content': ...}}), "
                        f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise TypeError(f"{where}, message {i}: expected a dict with a 'role' string, got {m!r}")


def as_conversations(messages: Any) -> tuple[list[Conversation], bool]:
    """(conversations, whether one conversation was given): ``messages`` is one conversation (a list
    of message dicts) or a list of them."""
    if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)) and messages \
            and all(isinstance(c, Sequence) and not isinstance(c, (str, bytes)) for c in messages):
        convs = list(messages)
        for i, c in enumerate(convs):
            check_conversation(c, i)
        return convs, False
    check_conversation(messages)
    return [messages], True


def template_source_from_dir(model_dir: str) -> str | None:
    """The chat template a checkpoint directory carries, or None (see the module docstring)."""
    jinja_file = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                value = json.load(f).get("chat_template")
        except (json.JSONDecodeError, AttributeError) as e:
            raise ValueError(f"{path} is not a JSON object: {e}") from e
        if isinstance(value, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        if isinstance(value, str) and value.strip():
            return value
    return None


def special_tokens_from_dir(model_dir: str) -> dict[str, str | None]:
    """``bos_token``/``eos_token``/... strings of ``tokenizer_config.json`` (plain or AddedToken dicts)."""
    path = os.path.join(model_dir, "tokenizer_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    out: dict[str, str | None] = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = cfg.get(name)
        out[name] = value.get("content") if isinstance(value, dict) else value
    return out
