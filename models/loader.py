"""Build the model on its device and stream HF safetensors into it, one tensor at a time."""
from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Iterator

import torch
from safetensors import safe_open

from attention.backend import AttentionBackend
from models.config import ModelConfig
from models.layers import default_weight_loader
from models.llama import LlamaForCausalLM

_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def safetensors_files(model_dir: str) -> list[str]:
    """The checkpoint's files: those named by ``model.safetensors.index.json``, else every ``*.safetensors``."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        absent = [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]
        if absent:
            raise FileNotFoundError(f"{index} names files that are not in {model_dir!r}: {absent}")
    else:
        names = sorted(n for n in os.listdir(model_dir) if n.endswith(".safetensors"))
    if not names:
        raise FileNotFoundError(f"no *.safetensors files in model directory {model_dir!r}")
    return [os.path.join(model_dir, n) for n in names]


def _hf_to_param(model: LlamaForCausalLM, hf_name: str) -> tuple[str, Any]:
    """HF tensor name -> (our parameter name, shard id or None)."""
    for packed, parts in model.packed_modules.items():
        for hf_part, shard_id in parts:
            token = f".{hf_part}."
            if token in hf_name:
                return hf_name.replace(token, f".{packed}."), shard_id
    return hf_name, None


def _param_to_hf(model: LlamaForCausalLM, name: str, shard_id: Any) -> str:
    for packed, parts in model.packed_modules.items():
        for hf_part, sid in parts:
            if f".{packed}." in name and sid == shard_id:
                return name.replace(f".{packed}.", f".{hf_part}.")
    return name


def _is_harmless(model: LlamaForCausalLM, hf_name: str) -> bool:
    if hf_name.endswith(_HARMLESS_SUFFIXES):
        return True
    return model.config.tie_word_embeddings and hf_name == "lm_head.weight"


def load_weights(model: LlamaForCausalLM, files: list[str]) -> None:
    """Copy every tensor of ``files`` into ``model`` through its parameters' weight loaders.

    Names are checked before anything is copied: ValueError names the tensors the model
    does not use, or those the checkpoint lacks; a shape mismatch names the tensor.
    """
    params = dict(model.named_parameters())
    needed = {(n, s) for n, p in params.items() for s in (getattr(p, "shard_ids", ()) or (None,))}
    plan: dict[str, list[tuple[str, str, Any]]] = {file: [] for file in files}
    unexpected = []
    for file in files:  # check every name before copying anything
        with safe_open(file, framework="pt") as f:
            for hf_name in f.keys():
                name, shard_id = _hf_to_param(model, hf_name)
                if (name, shard_id) in needed:
                    plan[file].append((hf_name, name, shard_id))
                elif not _is_harmless(model, hf_name):
                    unexpected.append(hf_name)
    if unexpected:
        raise ValueError(f"checkpoint has tensors the model does not use: {sorted(unexpected)}")
    planned = {(name, shard_id) for entries in plan.values() for _, name, shard_id in entries}
    missing = sorted(_param_to_hf(model, n, s) for n, s in needed - planned)
    if missing:
        raise ValueError(f"checkpoint lacks tensors the model needs: {missing}")
    with torch.no_grad():
        for file, entries in plan.items():
            with safe_open(file, framework="pt") as f:
                for hf_name, name, shard_id in entries:
                    param = params[name]
                    loader = getattr(param, "weight_loader", default_weight_loader)
                    try:
                        loader(param, f.get_tensor(hf_name), shard_id)
                    except ValueError as e:
                        raise ValueError(f"tensor {hf_name!r} in {os.path.basename(file)}: {e}") from None


def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Random weights in place (``load_format="dummy"``: benchmarks of real shapes, no checkpoint):
    norms 1, everything else N(0, std), drawn on the parameters' own device."""
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                g = torch.Generator(device=p.device).manual_seed(seed + i)
                p.normal_(0.0, std, generator=g)


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device | str,
               attn_backend: type[AttentionBackend], tp_rank: int = 0, tp_size: int = 1,
               load_format: str = "auto") -> LlamaForCausalLM:
    """The model of an HF directory, built directly on ``device`` in ``dtype`` (parameters are
    ``torch.empty``; no second copy of the weights) and filled from its safetensors, or with
    random weights when ``load_format="dummy"`` (only config.json is read)."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    config = ModelConfig.from_dir(model_dir)
    files = safetensors_files(model_dir) if load_format == "auto" else []
    with torch.device(device), _default_dtype(dtype):
        model = LlamaForCausalLM(config, attn_backend, tp_rank, tp_size)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, files)
    return model.eval()
