from __future__ import annotations

import hashlib

import numpy as np
import pytest

from engine.hashing import extend_block_hashes, hash_blocks, root_hash
from engine.request import Request
from engine.sampling_params import SamplingParams

pytestmark = pytest.mark.cpu


def _req(tokens: list[int], salt: str | None = None) -> Request:
    return Request("r", tokens, SamplingParams(), cache_salt=salt)


def test_hash_is_the_documented_chain() -> None:
    toks = list(range(40))
    got = hash_blocks(b"", toks, 16)
    assert len(got) == 2  # the partial third block has no hash
    # Independent re-derivation: sha256(parent + 5-byte marshal image of each token).
    enc = lambda ts: b"".join(b"i" + t.to_bytes(4, "little", signed=True) for t in ts)  # noqa: E731
    h0 = hashlib.sha256(enc(toks[:16])).digest()
    assert got == [h0, hashlib.sha256(h0 + enc(toks[16:32])).digest()]


def test_chain_depends_on_everything_before() -> None:
    a = hash_blocks(b"", [1] * 16 + [2] * 16, 16)
    b = hash_blocks(b"", [9] + [1] * 15 + [2] * 16, 16)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
    assert hash_blocks(b"", [1] * 16 + [2] * 16, 16) == a
    assert hash_blocks(b"", [1] * 16 + [2] * 16, 8) != a[:1]


def test_salt_changes_every_block() -> None:
    toks = list(range(48))
    plain, salted = _req(toks), _req(toks, salt="tenant-a")
    h_plain = extend_block_hashes(plain, 16, 48)
    h_salted = extend_block_hashes(salted, 16, 48)
    assert len(h_plain) == 3 and not set(h_plain) & set(h_salted)
    assert root_hash(None) == root_hash("") != root_hash("x") != root_hash("y")


def test_incremental_equals_one_shot() -> None:
    req = _req(list(range(20)))
    assert extend_block_hashes(req, 8, 5) == []
    assert len(extend_block_hashes(req, 8, 20)) == 2
    for t in range(20, 45):
        req.append_token(t)
        extend_block_hashes(req, 8, req.num_tokens)
    assert req.block_hashes == hash_blocks(b"", list(range(45)), 8)
    assert extend_block_hashes(req, 8, 1000) is req.block_hashes  # never past the known tokens


def test_ids_marshal_cannot_pack_are_hashed_consistently() -> None:
    big = [2**40 + i for i in range(32)]
    assert hash_blocks(b"", big, 16) == hash_blocks(b"", list(big), 16)
    npints = list(np.arange(32, dtype=np.int64))
    assert hash_blocks(b"", npints, 16) == hash_blocks(b"", list(np.arange(32, dtype=np.int64)), 16)
    assert len(set(hash_blocks(b"", big, 16))) == 2
