"""Build the model on its device and stream HF safetensors (or a GGUF file) into it, one tensor at a time."""
from __future__ import annotations

import contextlib
import json
import os
import zlib
from typing import Any, Iterable, Iterator

import torch
from safetensors import safe_open

from attention.backend import AttentionBackend
from distributed import TPGroup
from models.config import ModelConfig
from models.gguf import is_gguf, open_gguf
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


@contextlib.contextmanager
def _open(file: str) -> Iterator[Any]:
    """``safe_open`` whose errors (a truncated or corrupt file) name the file."""
    try:
        handle = safe_open(file, framework="pt")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
        size = os.path.getsize(file) if os.path.exists(file) else 0
        raise ValueError(f"cannot read safetensors file {file!r} ({size:,} bytes): {e}. It is truncated or "
                         f"corrupt: download or copy it again") from e
    with handle as f:
        yield f


def _hf_to_param(model: LlamaForCausalLM, hf_name: str) -> tuple[str, Any]:
    """HF tensor name -> (our parameter name, shard id or None)."""
    for prefix, ours in getattr(model, "hf_prefixes", {}).items():
        if hf_name.startswith(prefix):
            hf_name = ours + hf_name[len(prefix):]
            break
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


def hf_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF checkpoint's tensor names and full shapes for this config (Llama family)."""
    h, d, inter, v = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, q)), ("mlp.gate_proj", (inter, h)), ("mlp.up_proj", (inter, h)),
                            ("mlp.down_proj", (h, inter))):
            out[f"{p}{name}.weight"] = shape
        out[f"{p}input_layernorm.weight"] = out[f"{p}post_attention_layernorm.weight"] = (h,)
        if config.attention_bias:
            out.update({f"{p}self_attn.q_proj.bias": (q,), f"{p}self_attn.k_proj.bias": (kv,),
                        f"{p}self_attn.v_proj.bias": (kv,)})
        if config.o_proj_bias:
            out[f"{p}self_attn.o_proj.bias"] = (h,)
        if config.mlp_bias:
            out.update({f"{p}mlp.gate_proj.bias": (inter,), f"{p}mlp.up_proj.bias": (inter,),
                        f"{p}mlp.down_proj.bias": (h,)})
        if config.qk_norm:
            out[f"{p}self_attn.q_norm.weight"] = out[f"{p}self_attn.k_norm.weight"] = (d,)
    return out


def _plan(model: LlamaForCausalLM, hf_names: Iterable[str]) -> list[tuple[str, str, Any]]:
    """(hf name, parameter name, shard id) for every tensor to copy. ValueError names the tensors
    the model does not use, or those the checkpoint lacks, before anything is copied."""
    params = dict(model.named_parameters())
    needed = {(n, s) for n, p in params.items() for s in (getattr(p, "shard_ids", ()) or (None,))}
    plan, unexpected = [], []
    for hf_name in hf_names:
        name, shard_id = _hf_to_param(model, hf_name)
        if (name, shard_id) in needed:
            plan.append((hf_name, name, shard_id))
        elif not _is_harmless(model, hf_name):
            unexpected.append(hf_name)
    if unexpected:
        raise ValueError(f"checkpoint has tensors the model does not use: {sorted(unexpected)}")
    missing = sorted(_param_to_hf(model, n, s) for n, s in needed - {(n, s) for _, n, s in plan})
    if missing:
        raise ValueError(f"checkpoint lacks tensors the model needs: {missing}")
    return plan


def _copy(param: torch.nn.Parameter, loaded: Any, shard_id: Any, hf_name: str, where: str) -> None:
    loader = getattr(param, "weight_loader", default_weight_loader)
    try:
        loader(param, loaded, shard_id)
    except ValueError as e:
        raise ValueError(f"tensor {hf_name!r} in {where}: {e}") from None


def load_weights(model: LlamaForCausalLM, files: list[str]) -> None:
    """Copy every tensor of ``files`` into ``model`` through its parameters' weight loaders.

    Tensors are opened as lazy slices, so a tensor-parallel rank reads only its own rows or
    columns of each sharded weight. Names are checked before anything is copied (``_plan``);
    a shape mismatch names the tensor and its file.
    """
    file_of: dict[str, str] = {}
    for file in files:
        with _open(file) as f:
            file_of.update(dict.fromkeys(f.keys(), file))
    plan = _plan(model, file_of)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for file in files:
            with _open(file) as f:
                for hf_name, name, shard_id in plan:
                    if file_of[hf_name] == file:
                        _copy(params[name], f.get_slice(hf_name), shard_id, hf_name, os.path.basename(file))


def model_tensor_shapes(model: LlamaForCausalLM) -> dict[str, tuple[int, ...]]:
    """``hf_tensor_shapes`` plus a vision tower's tensors (replicated: their full shapes are the
    parameters'; a packed gate/up projection is two HF tensors)."""
    shapes = hf_tensor_shapes(model.config)
    visual = getattr(model, "visual", None)
    for name, p in visual.named_parameters() if visual is not None else ():
        if ".gate_up_proj." in name:
            half = (p.shape[0] // 2, *p.shape[1:])
            shapes[f"visual.{name.replace('.gate_up_proj.', '.gate_proj.')}"] = half
            shapes[f"visual.{name.replace('.gate_up_proj.', '.up_proj.')}"] = half
        else:
            shapes[f"visual.{name}"] = tuple(p.shape)
    return shapes


_NORMS = ("norm.weight", "norm1.weight", "norm2.weight", "ln_q.weight")


def dummy_tensor(hf_name: str, shape: tuple[int, ...], seed: int, std: float, dtype: torch.dtype,
                 device: torch.device | str) -> torch.Tensor:
    """One dummy tensor: drawn from a seed of its name (norm weights are 1)."""
    full = torch.empty(shape, dtype=dtype, device=device)
    if hf_name.endswith(_NORMS):
        return full.fill_(1.0)
    g = torch.Generator(device=device).manual_seed(seed + zlib.crc32(hf_name.encode()))
    return full.normal_(0.0, std, generator=g)


def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0, std: float = 0.02) -> None:
    """Random weights (``load_format="dummy"``: benchmarks of real shapes, no checkpoint): every
    HF tensor is drawn whole on the parameters' device from a seed of its name (norms are 1) and
    goes through the same weight loaders, so each tensor-parallel size gives the same model."""
    params = dict(model.named_parameters())
    shapes = model_tensor_shapes(model)
    with torch.no_grad():
        for hf_name, name, shard_id in _plan(model, shapes):
            p = params[name]
            full = dummy_tensor(hf_name, shapes[hf_name], seed, std, p.dtype, p.device)
            _copy(p, full, shard_id, hf_name, "dummy weights")
            del full


def load_model(model_dir: str, dtype: torch.dtype, device: torch.device | str,
               attn_backend: type[AttentionBackend], tp: TPGroup | None = None,
               load_format: str = "auto") -> LlamaForCausalLM:
    """The model of an HF directory or a GGUF file (this rank's shard of it under tensor parallelism), built
    directly on ``device`` in ``dtype`` (parameters are ``torch.empty``; no second copy of the
    weights) and filled from its safetensors (or the GGUF file's dequantized tensors), or with random
    weights when ``load_format="dummy"`` (only the config is read)."""
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    config = ModelConfig.from_dir(model_dir)
    gguf = is_gguf(model_dir)
    files = safetensors_files(model_dir) if load_format == "auto" and not gguf else []
    with torch.device(device), _default_dtype(dtype):
        model = model_class(config)(config, attn_backend, tp)
    if load_format == "dummy":
        init_dummy_weights(model)
    elif gguf:
        load_gguf_weights(model, model_dir)
    else:
        load_weights(model, files)
    return model.eval()


def model_class(config: ModelConfig) -> type[LlamaForCausalLM]:
    """The model class of a checkpoint's architecture (the Qwen2-VL family is imported only when used)."""
    if config.is_multimodal:
        from models.qwen2_vl import Qwen2VLForConditionalGeneration

        return Qwen2VLForConditionalGeneration
    return LlamaForCausalLM


def load_gguf_weights(model: LlamaForCausalLM, path: str) -> None:
    """Copy a GGUF file's weights into ``model`` (dequantized one tensor at a time; names checked
    first, as for safetensors)."""
    from models.gguf_weights import gguf_weights, hf_names

    f = open_gguf(path)
    plan = {hf: (name, shard_id) for hf, name, shard_id in _plan(model, hf_names(f))}
    params = dict(model.named_parameters())
    where = os.path.basename(f.path)
    with torch.no_grad():
        for hf_name, tensor in gguf_weights(f, model.config):
            if hf_name in plan:  # else harmless (e.g. a tied lm_head)
                name, shard_id = plan[hf_name]
                _copy(params[name], tensor, shard_id, hf_name, where)
