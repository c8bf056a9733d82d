"""A model's tokenizer and chat template, wherever the checkpoint keeps them: an HF directory
(tokenizer.json, tokenizer_config.json / chat_template.jinja) or a GGUF file's metadata."""
from __future__ import annotations

from tokenizers import Tokenizer

from engine.chat_template import ChatTemplate, special_tokens_from_dir, template_source_from_dir
from engine.tokenizer import load_tokenizer as load_dir_tokenizer
from models.gguf import is_gguf, open_gguf


def load_tokenizer(model: str) -> Tokenizer | None:
    """The model's tokenizer, or None when a directory has no tokenizer.json (prompts must then
    be token ids)."""
    if is_gguf(model):
        from models.gguf_tokenizer import build_tokenizer

        return build_tokenizer(open_gguf(model))
    return load_dir_tokenizer(model)


def load_chat_template(model: str, source: str | None = None) -> ChatTemplate | None:
    """The model's chat template (``source``, a template string, overrides it), or None when it has none."""
    if is_gguf(model):
        from models.gguf_tokenizer import special_tokens

        f = open_gguf(model)
        specials = special_tokens(f)
        source = source if source is not None else f.get("tokenizer.chat_template")
    else:
        specials = special_tokens_from_dir(model)
        source = source if source is not None else template_source_from_dir(model)
    return ChatTemplate(source, specials) if source else None
