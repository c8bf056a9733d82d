"""Incremental detokenization: whole characters only, stop strings across tokens."""
import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.cpu

TEXT = "héllo 世界 🎉! done"


def _bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    """A byte-level tokenizer: token id = byte value; id 256 is a special <eos>."""
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in _bytes_to_unicode().items()}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<eos>", special=True)])
    return tok


@pytest.fixture(scope="module")
def fallback_tok() -> Tokenizer:
    """SentencePiece-style: <0xNN> byte-fallback tokens (ids 0-255) plus a few pieces."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    vocab.update({"▁hello": 256, "▁world": 257, "<unk>": 258})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _ids(text: str) -> list[int]:
    return list(text.encode())


def _stream(detok: IncrementalDetokenizer, ids: list[int], sizes: list[int]) -> list[str]:
    deltas, i = [], 0
    for n in sizes:
        deltas.append(detok.update(ids[i:i + n]))
        i += n
    deltas.append(detok.update(ids[i:]))
    deltas.append(detok.finish())
    return deltas


@pytest.mark.parametrize("chunking", ["one", "random"])
def test_multibyte_characters_are_never_split(byte_tok, chunking):
    ids = _ids(TEXT)
    sizes = [1] * len(ids) if chunking == "one" else np.random.default_rng(0).integers(1, 4, 12).tolist()
    d = IncrementalDetokenizer(byte_tok, [104, 105])
    deltas = _stream(d, ids, sizes)
    assert "".join(deltas) == TEXT == d.output_text
    assert not any("\ufffd" in x for x in deltas)
    assert "" in deltas  # bytes of an unfinished character were held back


def test_text_is_always_a_prefix(byte_tok):
    d = IncrementalDetokenizer(byte_tok)
    for tok in _ids(TEXT):
        d.update([tok])
        assert TEXT.startswith(d.output_text)


def test_byte_fallback_tokens(fallback_tok):
    ids = [256] + _ids(" 世") + [257]
    d = IncrementalDetokenizer(fallback_tok)
    deltas = [d.update([t]) for t in ids]
    assert deltas == [" hello", " ", "", "", "世", " world"]
    assert d.finish() == "" and d.output_text == " hello 世 world"


def test_special_tokens_are_skipped(byte_tok):
    d = IncrementalDetokenizer(byte_tok)
    d.update(_ids("ab") + [256] + _ids("c"))
    assert d.output_text == "abc"
    d2 = IncrementalDetokenizer(byte_tok, skip_special_tokens=False)
    d2.update(_ids("ab") + [256])
    assert d2.output_text == "ab<eos>"


@pytest.mark.parametrize("full,stop,text,reason", [
    ("abc STOP def", ["STOP"], "abc ", "STOP"),
    ("abc STOP def", ["def", "c S"], "ab", "c S"),  # the earliest match wins
    (TEXT, ["世界"], "héllo ", "世界"),  # a stop string whose characters span tokens
    (TEXT, ["🎉!", "one"], "héllo 世界 ", "🎉!"),
    (TEXT, ["zzz", "ne!"], TEXT, None),
])
def test_stop_strings(byte_tok, full, stop, text, reason):
    ids = _ids(full)
    d = IncrementalDetokenizer(byte_tok, [1], SamplingParams(stop=stop))
    deltas = [d.update([t]) for t in ids]
    deltas.append(d.finish())
    assert d.stop_string == reason
    assert d.output_text == text and "".join(deltas) == text
    if reason is not None:  # it stopped at the token that completed the match
        end = full.index(reason) + len(reason)
        assert d.num_tokens == len(full[:end].encode())
        assert d.update(_ids("more")) == "" and d.output_text == text


def test_stop_inside_one_chunk_and_later_tokens_ignored(byte_tok):
    d = IncrementalDetokenizer(byte_tok, stop=["\n\n"])
    out = d.update(_ids("line one\n\nline two"))
    assert d.stop_string == "\n\n" and d.output_text == "line one" and out == "line one"
    assert d.num_tokens == len("line one\n\n")


def test_streaming_holds_back_a_possible_stop_prefix(byte_tok):
    d = IncrementalDetokenizer(byte_tok, stop=["XYZ"])
    assert d.update(_ids("abX")) == "a"  # "bX" might start "XYZ"... only 2 chars are held
    assert d.update(_ids("Y")) == "b"
    assert d.update(_ids("q")) == "X"
    assert d.finish() == "Yq"
    assert d.output_text == "abXYq" and d.stop_string is None


def test_finish_flushes_an_incomplete_tail(byte_tok):
    d = IncrementalDetokenizer(byte_tok)
    raw = _ids("hé")[:-1]  # the last byte of "é" never comes
    assert d.update(raw) == "h" and d.output_text == "h"
    assert d.finish() == "\ufffd" and d.output_text == "h\ufffd"


def test_bad_stop_strings(byte_tok):
    with pytest.raises(ValueError, match="stop must be a list of non-empty strings"):
        IncrementalDetokenizer(byte_tok, stop=[""])
