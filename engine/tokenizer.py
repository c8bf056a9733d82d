"""Loading a model directory's tokenizer (HF tokenizer.json through the `tokenizers` library)."""
from __future__ import annotations

import os

from tokenizers import Tokenizer


def load_tokenizer(model_dir: str) -> Tokenizer | None:
    """The directory's tokenizer.json, or None when it has none (prompts must then be token ids)."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the library raises bare Exceptions
        raise ValueError(f"cannot read the tokenizer {path}: {e}") from e
