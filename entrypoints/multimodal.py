"""Images of a prompt -> ``engine.multimodal.MultiModalInput``s: checked, preprocessed by the
checkpoint's image processor (``transformers``, the ``vision`` extra), each image's single
``<|image_pad|>`` token expanded to its merged-patch count, as HF's processor does.

A prompt with images is vLLM's dict: ``{"prompt": str}`` or ``{"prompt_token_ids": [...]}`` plus
``"multi_modal_data": {"image": img | [img, ...]}``, ``img`` a ``PIL.Image`` or an HxWx3 uint8 array.
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from engine.multimodal import MultiModalInput
from models.config import ModelConfig


def _as_image(img: Any, index: int, k: int) -> Any:
    """A PIL image or an HxWx3 uint8 array, else ValueError/TypeError naming prompt and image."""
    where = f"prompt {index}: image {k}"
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"{where}: an array image must be HxWx3 uint8 (RGB), got shape {img.shape} "
                             f"dtype {img.dtype}")
        if img.shape[0] < 1 or img.shape[1] < 1:
            raise ValueError(f"{where}: the image is empty (shape {img.shape})")
        return img
    if type(img).__module__.startswith("PIL.") and hasattr(img, "convert"):
        return img.convert("RGB")
    raise TypeError(f"{where}: expected a PIL.Image or an HxWx3 uint8 numpy array, got {type(img).__name__}")


def images_of(mm_data: Any, index: int) -> list[Any]:
    """The images of a prompt's ``multi_modal_data`` (checked), in order."""
    if mm_data is None:
        return []
    if not isinstance(mm_data, Mapping):
        raise TypeError(f"prompt {index}: multi_modal_data must be a dict like {{'image': [...]}}, "
                        f"got {type(mm_data).__name__}")
    unknown = sorted(set(mm_data) - {"image"})
    if unknown:
        raise ValueError(f"prompt {index}: multi_modal_data supports 'image' only, got {unknown}")
    images = mm_data.get("image")
    if images is None:
        return []
    if not isinstance(images, (list, tuple)):
        images = [images]
    return [_as_image(img, index, k) for k, img in enumerate(images)]


class ImageInputs:
    """Turns (token ids, images) into expanded token ids and ``MultiModalInput``s for one model."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self._processor: Any = None
        self._last: tuple = (None, None, None)  # (images, ids, result): the n samples of one prompt

    def processor(self) -> Any:
        if self._processor is None:
            try:
                from transformers import AutoImageProcessor
            except ImportError as e:
                raise ImportError("images need the transformers package (pip install 'model-runners[vision]')") from e
            self._processor = AutoImageProcessor.from_pretrained(self.config.path)
        return self._processor

    def __call__(self, ids: list[int], mm_data: Any, index: int) -> tuple[list[int], tuple[MultiModalInput, ...]]:
        if mm_data is not None and mm_data is self._last[0] and ids == self._last[1]:
            return self._last[2]  # the same prompt again (its next sample): processed once
        result = self._process(ids, mm_data, index)
        self._last = (mm_data, ids, result) if result[1] else (None, None, None)
        return result

    def forget(self) -> None:
        """Drop the last prompt's result (a new ``generate`` call: its images may have changed)."""
        self._last = (None, None, None)

    def _process(self, ids: list[int], mm_data: Any, index: int) -> tuple[list[int], tuple[MultiModalInput, ...]]:
        images = images_of(mm_data, index)
        cfg = self.config
        if not cfg.is_multimodal:
            if images:
                raise ValueError(f"prompt {index}: model {cfg.path!r} ({cfg.architecture}) takes no images")
            return ids, ()
        pad = cfg.image_token_id
        where = [i for i, t in enumerate(ids) if t == pad]
        if len(where) != len(images):
            raise ValueError(f"prompt {index}: {len(images)} image(s) but {len(where)} image placeholder token(s) "
                             f"(id {pad}); write each image as <|vision_start|><|image_pad|><|vision_end|>, "
                             f"one <|image_pad|> per image")
        if not images:
            return ids, ()
        out = self.processor()(images=images, return_tensors="np")
        pixels, grids = np.asarray(out["pixel_values"], dtype=np.float32), np.asarray(out["image_grid_thw"])
        merge = cfg.vision_config.get("spatial_merge_size", 2)
        new_ids: list[int] = []
        mm_inputs: list[MultiModalInput] = []
        prev, first = 0, 0
        for i, grid in zip(where, grids.tolist()):
            n_patches = grid[0] * grid[1] * grid[2]
            patches = np.ascontiguousarray(pixels[first:first + n_patches])
            first += n_patches
            length = n_patches // (merge * merge)
            new_ids += ids[prev:i]
            digest = hashlib.sha256(np.asarray(grid, np.int64).tobytes() + patches.tobytes()).digest()
            mm_inputs.append(MultiModalInput(len(new_ids), length, digest, patches, tuple(grid)))
            new_ids += [pad] * length
            prev = i + 1
        return new_ids + ids[prev:], tuple(mm_inputs)
