"""Qwen2-VL and Qwen2.5-VL through the whole stack (LLM -> scheduler -> CPURunner -> model) against
HF transformers, float32 on the CPU: greedy tokens equal, logits of every generated step within
1e-4, for prompts with 0, 1 and 2 images of different sizes - also with chunks that split an
image's placeholder run, with prefix caching, under preemption and with async scheduling."""
import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from tests.hf_models import VL_FAMILIES, VL_TOKENS, _hf_model, cached_hf_model

MAX_TOKENS = 6
START, PAD, END = VL_TOKENS["vision_start_token_id"], VL_TOKENS["image_token_id"], VL_TOKENS["vision_end_token_id"]
IMAGE = [START, PAD, END]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def image(seed: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def text(seed: int, n: int) -> list[int]:
    return np.random.default_rng(1000 + seed).integers(3, 370, n).tolist()


# (name, token ids with one pad per image, images): 0, 1 and 2 images of different sizes
PROMPTS = {
    "text": (text(0, 11), []),
    "one": (text(1, 5) + IMAGE + text(2, 7), [image(1, 50, 90)]),
    "two": (text(3, 4) + IMAGE + text(4, 3) + IMAGE + text(5, 6), [image(2, 120, 80), image(3, 60, 60)]),
}


def as_prompt(ids: list[int], images: list[np.ndarray]) -> dict:
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": images}} if images else {"prompt_token_ids": ids}


@pytest.fixture(scope="module", params=VL_FAMILIES)
def model_dir(request, tmp_path_factory):
    return cached_hf_model(request.param, tmp_path_factory)


_REFS: dict = {}


def hf_reference(model_dir: str, expanded: list[int], images: list[np.ndarray]) -> tuple[list[int], torch.Tensor]:
    """HF's greedy tokens for ``expanded`` (placeholders already expanded) and the logits of each step."""
    key = (model_dir, tuple(expanded), tuple(i.tobytes() for i in images))
    if key not in _REFS:
        from transformers import AutoImageProcessor

        hf = _hf_model(model_dir)
        hf.generation_config.eos_token_id = None
        kw = {}
        if images:
            px = AutoImageProcessor.from_pretrained(model_dir)(images=images, return_tensors="pt")
            kw = dict(pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"])
        ids = torch.tensor([expanded])
        with torch.no_grad():
            out = hf.generate(input_ids=ids, mm_token_type_ids=(ids == PAD).int(), max_new_tokens=MAX_TOKENS,
                              do_sample=False, pad_token_id=0, **kw)[0, len(expanded):].tolist()
            full = torch.tensor([expanded + out[:-1]])
            logits = hf(input_ids=full, mm_token_type_ids=(full == PAD).int(), **kw).logits[0, len(expanded) - 1:]
        _REFS[key] = (out, logits)
    return _REFS[key]


def generate(llm: LLM, names: list[str], images: dict | None = None) -> tuple[list, dict]:
    """Outputs of ``names`` (PROMPTS, images replaced where ``images`` says) and each request's logits."""
    recorded, steps = [], []
    compute_logits, execute = llm.runner.model.compute_logits, llm.runner.execute_model_async
    llm.runner.model.compute_logits = lambda h: recorded.append(compute_logits(h)) or recorded[-1]

    def spy(so):
        n = len(recorded)
        handle = execute(so)
        steps.append((handle, recorded[-1] if len(recorded) > n else None))
        return handle

    llm.runner.execute_model_async = spy
    try:
        outs = llm.generate([as_prompt(PROMPTS[n][0], (images or {}).get(n, PROMPTS[n][1])) for n in names], GREEDY)
    finally:
        llm.runner.model.compute_logits, llm.runner.execute_model_async = compute_logits, execute
    logits: dict[str, list] = {}
    for handle, lg in steps:
        out = handle.result()
        sampled = [r for r, t in zip(out.req_ids, out.sampled_token_ids) if t]
        for i, rid in enumerate(sampled):
            logits.setdefault(rid, []).append(lg[i])
    return outs, logits


def check(model_dir: str, names: list[str], outs: list, logits: dict, images: dict | None = None) -> None:
    for name, out in zip(names, outs):
        imgs = (images or {}).get(name, PROMPTS[name][1])
        ref, ref_logits = hf_reference(model_dir, out.prompt_token_ids, imgs)
        assert out.outputs[0].token_ids == ref, f"prompt {name!r} diverged from HF"
        ours = torch.stack(logits[out.request_id][:MAX_TOKENS])
        torch.testing.assert_close(ours, ref_logits, atol=1e-4, rtol=0, msg=lambda m: f"prompt {name!r}: {m}")


def engine(model_dir: str, **kw) -> LLM:
    args = dict(device="cpu", dtype="float32", block_size=8, num_kv_blocks=64, max_model_len=128,
                enable_prefix_caching=False)
    return LLM(model=model_dir, **{**args, **kw})


def test_placeholders_expand_to_the_merged_patch_count(model_dir):
    outs, _ = generate(engine(model_dir), ["two"])
    ids = outs[0].prompt_token_ids
    runs = [len(r) for r in "".join("x" if t == PAD else " " for t in ids).split()]
    assert runs == [12, 4]  # 120x80 -> 112x84 pixels -> 8x6 patches -> 12 tokens; 60x60 -> 56x56 -> 4


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_greedy_tokens_and_logits_match_hf(model_dir, async_scheduling):
    names = ["text", "one", "two"]
    check(model_dir, names, *generate(engine(model_dir, async_scheduling=async_scheduling), names))


def test_chunks_split_images(model_dir):
    """7-token chunks: images start and end inside chunks; the encoder budget (12 tokens, one large
    image) delays the second image of "two" to a later step than the first."""
    llm = engine(model_dir, max_num_batched_tokens=7, max_num_encoder_input_tokens=12)
    names = ["one", "two", "text"]
    check(model_dir, names, *generate(llm, names))


def test_prefix_caching_keys_blocks_by_image(model_dir):
    llm = engine(model_dir, enable_prefix_caching=True)
    first, _ = generate(llm, ["one"])
    assert first[0].num_cached_tokens == 0
    again, logits = generate(llm, ["one"])
    n = len(again[0].prompt_token_ids)
    assert again[0].num_cached_tokens == (n - 1) // 8 * 8, "the same image shares every full block"
    check(model_dir, ["one"], again, logits)
    other = {"one": [image(9, 50, 90)]}  # same size, so the same token ids
    outs, logits = generate(llm, ["one"], other)
    assert outs[0].prompt_token_ids == again[0].prompt_token_ids
    offset = outs[0].prompt_token_ids.index(PAD)
    assert outs[0].num_cached_tokens == offset // 8 * 8, "a different image shares only the blocks before it"
    check(model_dir, ["one"], outs, logits, other)
    generate(llm, ["two"])
    other = {"two": [PROMPTS["two"][1][0], image(8, 60, 60)]}  # the second image differs
    outs, logits = generate(llm, ["two"], other)
    second = outs[0].prompt_token_ids.index(PAD, outs[0].prompt_token_ids.index(END) + 1)
    assert outs[0].num_cached_tokens == second // 8 * 8 == 16, "the hit ends inside the first image"
    check(model_dir, ["two"], outs, logits, other)


def test_preemption_recomputes_images(model_dir):
    llm = engine(model_dir, num_kv_blocks=9)
    names = ["two", "one", "two"]
    outs, logits = generate(llm, names)
    assert llm.scheduler.num_preemptions > 0, "the pool was meant to run dry"
    check(model_dir, names, outs, logits)


def test_vision_tower_and_dummy_weights(model_dir):
    """Our vision transformer equals HF's on two images at once; load_format="dummy" builds the VL model."""
    from transformers import AutoImageProcessor

    from models.loader import load_model
    from tests.models.paged import REF_BACKEND

    images = [image(5, 50, 90), image(6, 120, 80)]
    px = AutoImageProcessor.from_pretrained(model_dir)(images=images, return_tensors="pt")
    with torch.no_grad():
        ref = torch.cat(_hf_model(model_dir).model.get_image_features(px["pixel_values"], px["image_grid_thw"])
                        .pooler_output)
        ours = load_model(model_dir, torch.float32, torch.device("cpu"), REF_BACKEND).embed_images(
            px["pixel_values"], [tuple(g) for g in px["image_grid_thw"].tolist()])
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    dummy = load_model(model_dir, torch.float32, torch.device("cpu"), REF_BACKEND, load_format="dummy")
    assert dummy.embed_images(px["pixel_values"], [(1, 4, 6), (1, 8, 6)]).shape == ref.shape
