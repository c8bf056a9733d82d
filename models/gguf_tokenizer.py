"""A ``tokenizers.Tokenizer`` built from a GGUF file's metadata (torch-free).

A GGUF holds no tokenizer.json: it stores the vocabulary (``tokenizer.ggml.tokens``), its token
types, the BPE merges or the sentencepiece scores, the special token ids, and the name of the
pre-tokenizer its merges were learned with (``tokenizer.ggml.pre``). Two families are built:

- ``gpt2``: byte-level BPE (Llama 3, SmolLM, Qwen): the pre-tokenizer's split regex by name,
  then GPT-2's byte alphabet;
- ``llama``: sentencepiece BPE with byte fallback (Llama 1/2, Mistral, TinyLlama): merges
  derived from the vocabulary's scores, ``▁`` for spaces.

Control tokens (type 3) become special tokens and user-defined ones (type 4) added tokens, so
both stay whole. ``tokenizer.ggml.add_bos_token`` decides whether encoding prepends BOS.
"""
from __future__ import annotations

import warnings
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from models.gguf import GGUFFile

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split regex or None for GPT-2's own, split digits one by one, ignore merges)
_PRE_TOKENIZERS: dict[str, tuple[str | None, bool, bool]] = {
    "default": (None, False, False), "gpt2": (None, False, False), "gpt-2": (None, False, False),
    "smollm": (None, True, False),
    "llama3": (_LLAMA3_SPLIT, False, True), "llama-v3": (_LLAMA3_SPLIT, False, True),
    "llama-bpe": (_LLAMA3_SPLIT, False, True), "smaug-bpe": (_LLAMA3_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, False, False), "deepseek-r1-qwen": (_QWEN2_SPLIT, False, False),
}


def build_tokenizer(f: GGUFFile) -> Tokenizer:
    """The file's tokenizer; ValueError for a tokenizer model other than ``gpt2`` or ``llama``."""
    kind = f.get("tokenizer.ggml.model")
    tokens = f.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError(f"GGUF file {f.path!r} has no tokenizer (tokenizer.ggml.tokens)")
    types = f.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if kind == "gpt2":
        tok = _byte_level_bpe(f, tokens)
        add_bos_default = False
    elif kind == "llama":
        tok = _sentencepiece_bpe(f, tokens, types)
        add_bos_default = True
    else:
        raise ValueError(f"GGUF file {f.path!r} has tokenizer model {kind!r}; supported: gpt2 (byte-level BPE), "
                         f"llama (sentencepiece BPE)")
    alphabet = set(_byte_to_unicode().values()) if kind == "gpt2" else None
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                if ty in (_CONTROL, _UNKNOWN) and (alphabet is None or set(t) <= alphabet)]
    tok.add_special_tokens(specials)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types)
                    if ty == _USER_DEFINED])
    bos = f.get("tokenizer.ggml.bos_token_id")
    if bool(f.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], int(bos))])
    return tok


def special_tokens(f: GGUFFile) -> dict[str, str | None]:
    """``bos_token``/``eos_token``/``unk_token``/``pad_token`` strings (chat templates use them)."""
    tokens = f.get("tokenizer.ggml.tokens") or []
    out: dict[str, str | None] = {}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        i = f.get(f"tokenizer.ggml.{key}_token_id")
        out[name] = tokens[i] if i is not None and 0 <= i < len(tokens) else None
    return out


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: printable bytes stand for themselves, the others map to U+0100..."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def _byte_level_bpe(f: GGUFFile, tokens: list[str]) -> Tokenizer:
    spell = _byte_to_unicode()
    alphabet = set(spell.values())
    # A token outside the byte alphabet (a mislabelled special) is spelled in it, so ids stay put.
    vocab = {(t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges") or []]
    pre = f.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        warnings.warn(f"GGUF file {f.path!r}: unknown pre-tokenizer {pre!r}; splitting text as GPT-2 does",
                      RuntimeWarning, stacklevel=3)
    split, digits, ignore_merges = _PRE_TOKENIZERS.get(pre, (None, False, False))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    steps: list[Any] = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens,
    best merged token's score first (ties: shorter left piece, then vocabulary order)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, int, int, int, str, str]] = []
    for t, score in zip(tokens, scores):
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in vocab and right in vocab:
                found.append((-score, len(left), vocab[left], vocab[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]


def _sentencepiece_bpe(f: GGUFFile, tokens: list[str], types: list[int]) -> Tokenizer:
    scores = f.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = f.get("tokenizer.ggml.unknown_token_id")
    merges = [tuple(m.split(" ", 1)) for m in f.get("tokenizer.ggml.merges") or []]
    if not merges:
        usable = [(t, s) for t, s, ty in zip(tokens, scores, types) if ty in (_NORMAL, _USER_DEFINED)]
        merges = sentencepiece_merges([t for t, _ in usable], [s for _, s in usable])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id] if unk_id is not None else None,
                               fuse_unk=True, byte_fallback=True))
    prefix = bool(f.get("tokenizer.ggml.add_space_prefix", True))
    # As HF converts it: the prefix "▁" only at the start of the text, and not before a leading space
    # (sentencepiece itself, and llama.cpp, also add it there and after special tokens).
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps: list[Any] = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok
