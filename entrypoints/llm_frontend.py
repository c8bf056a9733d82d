"""The parts of ``LLM``'s API built around ``generate``: ``n`` samples per prompt (one request
each), text streamed as it is generated (``on_text``), ``chat`` through the checkpoint's chat
template, and the report of ``max_tokens`` cut short by ``max_model_len``."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from engine.chat_template import ChatTemplate, as_conversations
from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import RequestOutput
from engine.parallel_sampling import sample_request_ids
from engine.request import Request
from engine.sampling_params import SamplingParams
from entrypoints.model_files import load_chat_template

if TYPE_CHECKING:
    from entrypoints.llm import LLM

OnText = Callable[[int, int, str], None]  # (prompt index, sample index, new text)


class StreamingDetokenizer(IncrementalDetokenizer):
    """An ``IncrementalDetokenizer`` that hands every new piece of text to a callback."""

    def __init__(self, *args: Any, on_text: Callable[[str], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_text = on_text

    def update(self, token_ids: Sequence[int]) -> str:
        return self._emit(super().update(token_ids))

    def finish(self) -> str:
        return self._emit(super().finish())

    def _emit(self, text: str) -> str:
        if text:
            self._on_text(text)
        return text


def _flatten_content(message: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI-style content parts (``[{"type": "text", "text": ...}]``) -> one string, as vLLM does."""
    m = dict(message)
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError(f"only text content parts are supported, got {part!r}")
            texts.append(part["text"])
        m["content"] = "\n".join(texts)
    return m


def check_params(params: SamplingParams, index: int) -> None:
    """Validate a prompt's sampling params again (a field may have changed since construction)."""
    try:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        params.validate()
    except (TypeError, ValueError) as e:
        raise type(e)(f"prompt {index}: sampling_params: {e}") from None


class LLMFrontend:
    """Mixed into ``LLM`` (kept in its own module)."""

    def _make_requests(self: "LLM", prompts: list[str | list[int]], params: list[SamplingParams]
                       ) -> tuple[list[Request], list[str | list[int]], list[tuple[str, int]]]:
        """(requests, each one's prompt, (request id, n) per prompt): one request per sample, all
        checked before any is queued; sample requests are registered for ``abort`` and ``on_text``."""
        self._samples.clear()  # left from a call whose prompts were refused
        self._image_inputs.forget()  # images are processed once per prompt of this call
        self._stream_targets.clear()
        requests: list[Request] = []
        per_request: list[str | list[int]] = []
        parents: list[tuple[str, int]] = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            check_params(sp, i)
            parent = f"req-{next(self._ids)}"
            ids = sample_request_ids(parent, sp.n)
            requests += [self._make_request(p, sp.sample(k), i, rid) for k, rid in enumerate(ids)]
            self._stream_targets.update((rid, (i, k)) for k, rid in enumerate(ids))
            per_request += [p] * sp.n
            parents.append((parent, sp.n))
            if sp.n > 1:
                self._samples[parent] = ids
        return requests, per_request, parents

    def _warn_if_truncated(self: "LLM", params: SamplingParams, num_prompt_tokens: int, index: int) -> None:
        """A UserWarning, once per engine, when ``max_tokens`` is more than ``max_model_len`` leaves."""
        room = self.config.max_model_len - num_prompt_tokens
        if params.max_tokens is not None and params.max_tokens > room and not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(f"prompt {index}: max_tokens={params.max_tokens} is more than max_model_len="
                          f"{self.config.max_model_len} leaves after its {num_prompt_tokens} prompt tokens: at most "
                          f"{room} tokens are generated (finish_reason 'length'); further truncations are not reported",
                          UserWarning, stacklevel=5)

    def get_chat_template(self: "LLM", chat_template: str | None = None) -> ChatTemplate:
        """The model's chat template (``chat_template``, a jinja2 string, overrides it); ValueError
        naming where one is looked for when the model has none."""
        if chat_template is None and getattr(self, "_chat_template", None) is not None:
            return self._chat_template
        template = load_chat_template(self.config.model, chat_template)
        if template is None:
            raise ValueError(f"model {self.config.model!r} has no chat template (looked for chat_template.jinja, "
                             f"chat_template.json, tokenizer_config.json's 'chat_template', or a GGUF file's "
                             f"tokenizer.chat_template): pass chat_template=<jinja2 template string>")
        if chat_template is None:
            self._chat_template = template
        return template

    def chat(self: "LLM", messages: Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool | None = None, chat_template: str | None = None, add_generation_prompt: bool = True,
             chat_template_kwargs: dict[str, Any] | None = None, *,
             on_text: OnText | None = None) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` messages) or a
        list of conversations; returns one ``RequestOutput`` per conversation, whose ``prompt`` is
        the rendered text. The template is rendered with jinja2 (``add_generation_prompt``
        appends the assistant's turn header) and tokenized without adding special tokens.
        ``on_text``: see ``generate``."""
        if self.tokenizer is None:
            raise ValueError(f"model {self.config.model!r} has no tokenizer: chat needs one")
        template = self.get_chat_template(chat_template)
        conversations, _ = as_conversations(messages)
        texts, prompts = [], []
        for i, conv in enumerate(conversations):
            try:
                text = template.render([_flatten_content(m) for m in conv], add_generation_prompt,
                                       **(chat_template_kwargs or {}))
            except ValueError as e:
                raise ValueError(f"conversation {i}: {e}") from None
            texts.append(text)
            prompts.append(self.tokenizer.encode(text, add_special_tokens=False).ids)
        outs = self.generate(prompts, sampling_params, use_tqdm, on_text=on_text)
        for out, text in zip(outs, texts):
            out.prompt = text
        return outs

    def _new_detokenizer(self: "LLM", req: Any) -> IncrementalDetokenizer:
        """The detokenizer of one request; streaming when ``generate`` was given ``on_text``."""
        target = self._stream_targets.get(req.request_id) if self._on_text is not None else None
        if target is None:
            return IncrementalDetokenizer(self.tokenizer, req.prompt_token_ids, req.sampling_params)
        on_text, (prompt, sample) = self._on_text, target
        return StreamingDetokenizer(self.tokenizer, req.prompt_token_ids, req.sampling_params,
                                    on_text=lambda text: on_text(prompt, sample, text))
