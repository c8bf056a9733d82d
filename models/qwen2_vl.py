"""Qwen2-VL and Qwen2.5-VL: the Llama-family decoder with M-RoPE (models/llama.py, models/mrope.py)
and the vision transformer (models/qwen2_vl_vision.py), which the runner calls through
``embed_images`` and whose outputs come back into ``forward`` as ``mm_embeds``."""
from __future__ import annotations

import torch

from attention.backend import AttentionBackend
from distributed import TPGroup
from models.config import ModelConfig
from models.llama import LlamaForCausalLM
from models.qwen2_vl_vision import VisionTransformer


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    """The language model is tensor-parallel like any Llama; the vision tower is replicated."""

    # checkpoint prefixes of transformers >= 5 -> ours (older checkpoints already use ours)
    hf_prefixes: dict[str, str] = {"model.language_model.": "model.", "model.visual.": "visual."}

    def __init__(self, config: ModelConfig, attn_backend: type[AttentionBackend], tp: TPGroup | None = None) -> None:
        super().__init__(config, attn_backend, tp)
        qwen25 = config.architecture == "Qwen2_5_VLForConditionalGeneration"
        self.visual = VisionTransformer(config.vision_config, config.hidden_size, qwen25)

    @property
    def spatial_merge_size(self) -> int:
        return self.visual.merge

    def embed_images(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """Encoder outputs ``[sum(t*h*w) / merge**2, hidden]`` of several images, in order."""
        return self.visual(pixel_values, grid_thw)
