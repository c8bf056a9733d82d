"""Prompt types, checked before anything is queued: a prompt is a ``str``, a sequence of
integer token ids (Python or numpy integers; not bool, not bytes), or a dict (vLLM's) with one of
``"prompt"`` (str) or ``"prompt_token_ids"`` and optionally ``"multi_modal_data"`` (images, checked
by the entrypoint). Errors name the prompt's index."""
from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Set
from typing import Any, Union

Prompt = Union[str, list[int], dict]
_DICT_KEYS = {"prompt", "prompt_token_ids", "multi_modal_data"}
_BYTES = (bytes, bytearray, memoryview)
_ACCEPTED = "a str or a sequence of int token ids"


def _is_token(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)  # numpy's bool_ is not Integral


def _starts_with_scalar(seq: Iterable) -> bool:
    """True if the first item is a number-like scalar: then ``seq`` is one token-id prompt."""
    for x in seq:
        return x is not None and not isinstance(x, (str, *_BYTES, Iterable))
    return False


def normalize_prompts(prompts: Any) -> list[Prompt]:
    """One prompt or a sequence of prompts -> a list of prompts (token ids as Python ints).

    TypeError for anything else, naming the bad prompt's index. Token *values* (vocabulary
    range, length) are the engine's to check.
    """
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Mapping):
        return [dict_prompt(prompts, 0)]
    if isinstance(prompts, _BYTES):
        raise TypeError(f"prompts: got {type(prompts).__name__}; a prompt is {_ACCEPTED}: decode bytes "
                        f"to str first")
    if prompts is None or isinstance(prompts, (Mapping, Set)) or not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a prompt ({_ACCEPTED}) or a list of prompts, got "
                        f"{type(prompts).__name__}")
    if getattr(prompts, "ndim", None) is None:
        prompts = list(prompts)  # an iterator is read once
    if getattr(prompts, "ndim", None) == 1 or _starts_with_scalar(prompts):
        return [token_ids(prompts, 0)]  # one prompt of token ids
    return [p if isinstance(p, str) else dict_prompt(p, i) if isinstance(p, Mapping) else token_ids(p, i)
            for i, p in enumerate(prompts)]


def dict_prompt(prompt: Mapping, index: int) -> dict:
    """A dict prompt, checked: exactly one of "prompt" (str) / "prompt_token_ids"; token ids normalised."""
    unknown = sorted(set(prompt) - _DICT_KEYS, key=str)
    if unknown:
        raise TypeError(f"prompt {index}: unknown key(s) {unknown}; a dict prompt has {sorted(_DICT_KEYS)}")
    if ("prompt" in prompt) == ("prompt_token_ids" in prompt):
        raise TypeError(f"prompt {index}: a dict prompt needs exactly one of 'prompt' and 'prompt_token_ids'")
    out = dict(prompt)
    if "prompt" in out:
        if not isinstance(out["prompt"], str):
            raise TypeError(f"prompt {index}: 'prompt' must be a str, got {type(out['prompt']).__name__}")
    else:
        out["prompt_token_ids"] = token_ids(out["prompt_token_ids"], index)
    return out


def token_ids(prompt: Any, index: int) -> list[int]:
    """A token-id prompt as a list of Python ints; TypeError naming prompt ``index`` otherwise."""
    if isinstance(prompt, _BYTES):
        raise TypeError(f"prompt {index}: got {type(prompt).__name__}; a prompt is {_ACCEPTED}: decode "
                        f"bytes to str first")
    if prompt is None or isinstance(prompt, (Mapping, Set, str)) or not isinstance(prompt, Iterable) \
            or getattr(prompt, "ndim", 1) != 1:
        raise TypeError(f"prompt {index}: expected {_ACCEPTED}, got {type(prompt).__name__}")
    ids = list(prompt)
    if set(map(type, ids)) <= {int}:  # the common case, checked at C speed (bool is its own type)
        return ids
    for pos, t in enumerate(ids):
        if not _is_token(t):
            raise TypeError(f"prompt {index}: token ids must be integers (not bool), got {t!r} "
                            f"({type(t).__name__}) at position {pos}")
    return [int(t) for t in ids]
