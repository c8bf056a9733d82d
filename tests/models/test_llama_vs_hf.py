"""Our decoder against HF transformers, every family, float32 on CPU."""
import pytest
import torch

from models.loader import load_model
from tests.hf_models import hf_logits
from tests.models.paged import (REF_BACKEND, BlockPool, build_metadata, kv_caches, positions_of,
                               prefill_metadata)

pytestmark = pytest.mark.cpu

ATOL = 1e-4
LENGTHS = (7, 23, 1, 40, 12)


def _sequences(vocab: int, lengths=LENGTHS, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def models():
    cache = {}

    def get(model_dir):
        if model_dir not in cache:
            cache[model_dir] = load_model(model_dir, torch.float32, torch.device("cpu"), REF_BACKEND)
        return cache[model_dir]
    return get


@torch.no_grad()
def test_full_prefill_matches_hf(hf_model_dir, models):
    model = models(hf_model_dir)
    seqs = _sequences(model.config.vocab_size)
    lengths = [len(s) for s in seqs]
    ids = torch.tensor(sum(seqs, []))
    hidden = model(ids, positions_of([0] * len(seqs), lengths), [None] * model.config.num_hidden_layers,
                   prefill_metadata(lengths))
    logits = model.compute_logits(hidden)
    assert logits.shape == (sum(lengths), model.config.vocab_size)
    start = 0
    for seq in seqs:
        torch.testing.assert_close(logits[start:start + len(seq)], hf_logits(hf_model_dir, seq), atol=ATOL, rtol=0)
        start += len(seq)


def _schedule(length: int, first: int, chunk: int, decodes: int) -> list[int]:
    """Chunk sizes covering ``length`` tokens: a first prefill, chunks, then single-token decodes."""
    sizes = [min(first, length - decodes)]
    while sum(sizes) < length - decodes:
        sizes.append(min(chunk, length - decodes - sum(sizes)))
    return sizes + [1] * decodes


@torch.no_grad()
def test_paged_chunked_prefill_and_decode_match_hf(hf_model_dir, models):
    model = models(hf_model_dir)
    cfg = model.config
    seqs = _sequences(cfg.vocab_size, lengths=(30, 13, 45, 9), seed=1)
    # (first prefill, chunk, decodes, first step): requests join late, phases overlap (mixed batches)
    plans = [(11, 8, 4, 0), (4, 5, 3, 0), (7, 16, 5, 2), (2, 3, 4, 4)]
    schedules = [(_schedule(len(s), f, c, d), start) for s, (f, c, d, start) in zip(seqs, plans)]
    block_size = 4
    pool = BlockPool(num_blocks=64, block_size=block_size, seed=3)
    caches = kv_caches(cfg.num_hidden_layers, 64, block_size, cfg.num_key_value_heads, cfg.head_dim)
    done, chunk_idx = [0] * len(seqs), [0] * len(seqs)
    step, saw_mixed, saw_multi_decode = 0, False, False
    while any(done[r] < len(s) for r, s in enumerate(seqs)):
        batch = [r for r, (sizes, start) in enumerate(schedules) if step >= start and done[r] < len(seqs[r])]
        step += 1
        if not batch:
            continue
        new = [schedules[r][0][chunk_idx[r]] for r in batch]
        computed = [done[r] for r in batch]
        tables = [pool.reserve(r, done[r] + n) for r, n in zip(batch, new)]
        ids = torch.tensor([t for r, c, n in zip(batch, computed, new) for t in seqs[r][c:c + n]])
        md = build_metadata(computed, new, tables, block_size)
        logits = model.compute_logits(model(ids, positions_of(computed, new), caches, md))
        start = 0
        for r, c, n in zip(batch, computed, new):
            expected = hf_logits(hf_model_dir, seqs[r])[c:c + n]
            torch.testing.assert_close(logits[start:start + n], expected, atol=ATOL, rtol=0,
                                       msg=lambda m: f"request {r}, tokens {c}:{c + n}: {m}")
            start += n
            done[r] += n
            chunk_idx[r] += 1
        saw_mixed |= 1 in new and max(new) > 1
        saw_multi_decode |= new.count(1) > 1
    assert saw_mixed and saw_multi_decode  # the schedule really exercised both batch kinds


@torch.no_grad()
def test_padding_is_inert(hf_model_factory, models):
    model_dir = hf_model_factory("qwen3")
    model = models(model_dir)
    cfg = model.config
    seqs = _sequences(cfg.vocab_size, lengths=(6, 9), seed=2)
    block_size, pad_tokens = 8, 5
    pool = BlockPool(num_blocks=16, block_size=block_size)
    caches = kv_caches(cfg.num_hidden_layers, 16, block_size, cfg.num_key_value_heads, cfg.head_dim)
    lengths = [len(s) for s in seqs]
    tables = [pool.reserve(r, n) for r, n in enumerate(lengths)]
    md = build_metadata([0, 0], lengths, tables, block_size, pad_tokens=pad_tokens, pad_reqs=2)
    ids = torch.tensor(sum(seqs, []) + [0] * pad_tokens)
    logits = model.compute_logits(model(ids, positions_of([0, 0], lengths, pad_tokens), caches, md))
    assert logits.shape[0] == sum(lengths) + pad_tokens
    torch.testing.assert_close(logits[:6], hf_logits(model_dir, seqs[0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[6:15], hf_logits(model_dir, seqs[1]), atol=ATOL, rtol=0)
