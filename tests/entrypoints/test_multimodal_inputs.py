"""Image prompts: vLLM's dict format, bad input refused before anything is queued with errors that
name the prompt (and the image), PIL images and arrays alike."""
from __future__ import annotations

import numpy as np
import pytest

from engine import LLM, SamplingParams
from tests.entrypoints.fake_executor import fake_llm
from tests.hf_models import VL_TOKENS, cached_hf_model

pytestmark = pytest.mark.cpu
PAD = VL_TOKENS["image_token_id"]
ONE = [5, 6, VL_TOKENS["vision_start_token_id"], PAD, VL_TOKENS["vision_end_token_id"], 7]
PARAMS = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


def _image(h: int = 40, w: int = 60, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    return LLM(model=cached_hf_model("qwen2_vl", tmp_path_factory), device="cpu", dtype="float32",
               block_size=16, num_kv_blocks=32, max_model_len=128)


@pytest.mark.parametrize("prompt, error, message", [
    ({"prompt_token_ids": ONE, "multi_modal_data": {"image": [_image(), _image()]}}, ValueError,
     r"prompt 1: 2 image\(s\) but 1 image placeholder token\(s\) \(id 380\).*one <\|image_pad\|> per image"),
    ({"prompt_token_ids": ONE}, ValueError, r"prompt 1: 0 image\(s\) but 1 image placeholder"),
    ({"prompt_token_ids": ONE, "multi_modal_data": {"image": _image()[:, :, 0]}}, ValueError,
     r"prompt 1: image 0: an array image must be HxWx3 uint8 \(RGB\), got shape \(40, 60\)"),
    ({"prompt_token_ids": ONE, "multi_modal_data": {"image": _image().astype(np.float32)}}, ValueError,
     r"prompt 1: image 0: .*dtype float32"),
    ({"prompt_token_ids": ONE, "multi_modal_data": {"image": [[1, 2, 3]]}}, TypeError,
     r"prompt 1: image 0: expected a PIL.Image or an HxWx3 uint8 numpy array, got list"),
    ({"prompt_token_ids": ONE, "multi_modal_data": {"video": _image()}}, ValueError,
     r"prompt 1: multi_modal_data supports 'image' only, got \['video'\]"),
    ({"prompt_token_ids": ONE, "multi_modal_data": [_image()]}, TypeError, r"prompt 1: multi_modal_data must be a dict"),
    ({"prompt": "x", "prompt_token_ids": ONE}, TypeError, "prompt 1: a dict prompt needs exactly one of"),
    ({"prompt_token_ids": ONE, "images": []}, TypeError, r"prompt 1: unknown key\(s\) \['images'\]"),
])
def test_bad_image_prompts_are_refused(vl, prompt, error, message):
    with pytest.raises(error, match=message):
        vl.generate([{"prompt_token_ids": [5, 6]}, prompt], PARAMS)
    assert not vl.scheduler.has_unfinished_requests()


def test_an_image_for_a_text_only_model_is_refused():
    llm = fake_llm(device="cpu", block_size=16, num_kv_blocks=8, max_model_len=64)
    with pytest.raises(ValueError, match=r"prompt 0: model .* \(LlamaForCausalLM\) takes no images"):
        llm.generate({"prompt_token_ids": [1, 2, 3], "multi_modal_data": {"image": _image()}}, PARAMS)
    assert llm.executor.calls == 0
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, PARAMS)  # a dict without images is fine
    assert len(out[0].outputs[0].token_ids) == 3


def test_pil_images_and_arrays_give_the_same_result(vl):
    from PIL import Image

    img = _image(70, 50, seed=3)
    as_array = vl.generate({"prompt_token_ids": ONE, "multi_modal_data": {"image": img}}, PARAMS)[0]
    as_pil = vl.generate({"prompt_token_ids": ONE, "multi_modal_data": {"image": [Image.fromarray(img)]}}, PARAMS)[0]
    assert as_pil.outputs[0].token_ids == as_array.outputs[0].token_ids
    assert as_pil.prompt_token_ids == as_array.prompt_token_ids and as_pil.prompt_token_ids.count(PAD) == 4
    rgba = vl.generate({"prompt_token_ids": ONE, "multi_modal_data": {"image": Image.fromarray(img).convert("RGBA")}},
                       PARAMS)[0]  # converted to RGB, as HF's processor does
    assert rgba.outputs[0].token_ids == as_array.outputs[0].token_ids


def test_the_samples_of_an_image_prompt_process_it_once(vl):
    processor = vl._image_inputs.processor()
    calls = []
    vl._image_inputs._processor = lambda **kw: calls.append(1) or processor(**kw)
    try:
        prompt = {"prompt_token_ids": ONE, "multi_modal_data": {"image": _image(seed=4)}}
        out = vl.generate(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, n=3))[0]
        assert len(calls) == 1 and len({tuple(o.token_ids) for o in out.outputs}) == 1
        vl.generate(prompt, PARAMS)
        assert len(calls) == 2, "a new call processes its images again"
    finally:
        vl._image_inputs._processor = processor
