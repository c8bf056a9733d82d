"""The conformance suite's multimodal case (runners.testing): a tiny random Qwen2-VL checkpoint
written without ``transformers``, hand-made image inputs, and a reference that recomputes the
whole sequence each step on the CPU (M-RoPE positions, every image encoded, no KV cache)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

from typing import Any

import numpy as np
import torch

from engine.multimodal import MultiModalInput
from runners.multimodal import mrope_positions
from runners.testing_checks import _prefill_md, _reference_model

IMAGE_TOKEN = 300
VL_CONFIG = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "vocab_size": 320,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 512, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
    "tie_word_embeddings": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    "image_token_id": IMAGE_TOKEN, "video_token_id": 301, "vision_start_token_id": 302, "vision_end_token_id": 303,
    "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                      "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
}


def tiny_vl_model_dir() -> str:
    """A tiny random Qwen2-VL checkpoint (float32, in the old flat config format), written once
    under ``$RUNNERS_CACHE_DIR`` (else ``~/.cache/model-runners``)."""
    from safetensors.torch import save_file

    from attention.torch_ref import TorchAttentionBackend
    from models.config import ModelConfig
    from models.loader import dummy_tensor, model_tensor_shapes
    from models.qwen2_vl import Qwen2VLForConditionalGeneration

    root = os.environ.get("RUNNERS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "model-runners")
    path = os.path.join(root, "tiny-qwen2-vl-v1")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root)
    config = ModelConfig.from_dict(VL_CONFIG)
    shapes = model_tensor_shapes(Qwen2VLForConditionalGeneration(config, TorchAttentionBackend))
    save_file({n: dummy_tensor(n, s, 0, 0.1, torch.float32, "cpu") for n, s in shapes.items()},
              os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(VL_CONFIG, f)
    try:
        os.rename(tmp, path)
    except OSError:  # another process wrote it first
        pass
    return path


def image_input(offset: int, grid: tuple[int, int, int], seed: int) -> MultiModalInput:
    """An image of ``grid`` patches whose placeholders start at ``offset`` (random pixels)."""
    t, h, w = grid
    pixels = np.random.default_rng(seed).standard_normal((t * h * w, 3 * 2 * 14 * 14)).astype(np.float32)
    return MultiModalInput(offset, t * h * w // 4, hashlib.sha256(pixels.tobytes()).digest(), pixels, grid)


def image_prompt(seed: int, parts: list[int | tuple[int, int, int]]) -> tuple[list[int], tuple[MultiModalInput, ...]]:
    """Token ids and images of ``parts``: an int is that many random text tokens, a tuple an image's grid."""
    g = np.random.default_rng(seed)
    ids: list[int] = []
    images = []
    for k, part in enumerate(parts):
        if isinstance(part, int):
            ids += g.integers(3, 256, part).tolist()
        else:
            images.append(image_input(len(ids), part, seed * 10 + k))
            ids += [IMAGE_TOKEN] * images[-1].length
    return ids, tuple(images)


@torch.inference_mode()
def reference_greedy_mm(model_dir: str, prompt: tuple[int, ...], images: tuple[MultiModalInput, ...],
                        n: int) -> list[int]:
    """n greedy tokens of an image prompt by full recomputation on the CPU in float32."""
    model = _reference_model(model_dir)
    pos, delta = mrope_positions(len(prompt), images, model.visual.merge)
    embeds = model.embed_images(torch.from_numpy(np.concatenate([m.pixel_values for m in images])),
                                [m.grid_thw for m in images])
    where = torch.from_numpy(np.concatenate([np.arange(m.offset, m.end) for m in images]))
    ids = list(prompt)
    for _ in range(n):
        extra = np.arange(len(prompt), len(ids)) + delta
        positions = torch.from_numpy(np.concatenate([pos, np.broadcast_to(extra, (3, len(extra)))], axis=1))
        hidden = model(torch.tensor(ids), positions, [None] * model.config.num_hidden_layers, _prefill_md(len(ids)),
                       (where, embeds))
        ids.append(int(model.compute_logits(hidden[-1:]).float().argmax(-1)))
    return ids[len(prompt):]


def check_multimodal(suite: Any) -> None:
    """The suite's multimodal case on a fresh runner of the tiny Qwen2-VL model."""
    from runners.testing_steps import StepBuilder
    from runners.testing_checks import assert_tokens, finish_initialize, load_and_profile, reference_greedy

    model_dir = tiny_vl_model_dir()
    runner = suite.new_runner(model_dir)
    finish_initialize(runner, load_and_profile(runner))
    steps = StepBuilder(runner)
    pa, images = image_prompt(1, [5, (1, 4, 6), 3, (1, 4, 4), 4])  # images at [5, 11) and [14, 18)
    pb = image_prompt(2, [9])[0]
    want = reference_greedy_mm(model_dir, tuple(pa), images, 8)
    out = runner.execute_model(steps.step(new=[("a", pa, 0, 8), ("b", pb, 0, len(pb))], images={"a": images}))
    live = {"a": [], "b": suite.tokens(out, "b")}
    out = runner.execute_model(steps.step(cached=[("a", 8, 7), ("b", len(pb), 1)]))  # ends inside image 2
    live["b"] += suite.tokens(out, "b")
    out = runner.execute_model(steps.step(cached=[("a", 15, len(pa) - 15), ("b", len(pb) + 1, 1)]))
    live["a"] += suite.tokens(out, "a")
    live["b"] += suite.tokens(out, "b")
    suite.decode(runner, steps, live, 3)
    assert_tokens("an image request prefilled in chunks that split its images", live["a"], want[:4])
    assert_tokens("a text request beside it", live["b"], reference_greedy(model_dir, tuple(pb), 6))
    steps.preempt("a")
    runner.execute_model(steps.step(cached=[("b", len(pb) + 5, 1)]))
    n = len(pa) + len(live["a"])
    out = runner.execute_model(steps.step(cached=[("a", 0, n)], resumed={"a"}))
    live["a"] += suite.tokens(out, "a")
    suite.decode(runner, steps, {"a": live["a"]}, 3)
    assert_tokens("the image request, preempted and recomputed", live["a"], want)
    for rid in list(steps.blocks):
        steps.finish(rid)
    runner.execute_model(steps.step())
    assert not runner.mm.cache and not runner.mm.requests, "finished requests leave no encoder state behind"

