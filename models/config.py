"""The model's shape, read from an HF directory's config.json or a GGUF file's metadata (torch-free)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from models.gguf import hf_config, is_gguf, open_gguf

VL_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           *VL_ARCHITECTURES)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {"linear": ("factor",),
              "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


@dataclass
class ModelConfig:
    """Everything the model and the runner need to know about a checkpoint.

    ``rope_scaling`` is None for plain RoPE, else ``{"rope_type": ..., <its parameters>}``
    (old ``rope_scaling`` and transformers-5 ``rope_parameters`` both normalise to it).
    ``attention_bias`` is the q/k/v bias; ``o_proj_bias`` and ``mlp_bias`` are separate
    because Qwen2 has the first without the second. ``sliding_window`` is exposed, not
    implemented: the runner refuses ``max_model_len`` beyond it.
    """

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None
    # Qwen2-VL family: M-RoPE sections (halves of head_dim over temporal/height/width), the
    # vision tower's raw config, and the special token ids of an image.
    mrope_section: tuple[int, ...] | None = None
    vision_config: dict[str, Any] | None = None
    image_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision_end_token_id: int | None = None
    path: str | None = field(default=None, compare=False)

    @property
    def is_multimodal(self) -> bool:
        """Whether the model takes images (a vision encoder, M-RoPE positions)."""
        return self.vision_config is not None

    def check_tensor_parallel(self, tp_size: int) -> None:
        """ValueError unless the model can be split over ``tp_size`` ranks: attention heads and
        the MLP width divide evenly; KV heads divide evenly, or ranks are a multiple of them
        (each KV head then replicated). The vocabulary is padded, so any size works there."""
        where = f" of {self.path}" if self.path else ""
        for name in ("num_attention_heads", "intermediate_size"):
            if getattr(self, name) % tp_size:
                raise ValueError(f"tensor_parallel_size={tp_size} does not divide {name}={getattr(self, name)}{where}")
        kv = self.num_key_value_heads
        if kv % tp_size and tp_size % kv:
            raise ValueError(f"tensor_parallel_size={tp_size} neither divides num_key_value_heads={kv}{where} "
                             "nor is a multiple of it (to replicate each KV head on the same number of ranks)")

    def kv_heads_per_rank(self, tp_size: int) -> int:
        """KV heads one rank holds: an even split, or 1 (replicated) when ranks outnumber them."""
        self.check_tensor_parallel(tp_size)
        return max(self.num_key_value_heads // tp_size, 1)

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> "ModelConfig":
        """Parse ``path/config.json`` (plus ``generation_config.json`` for EOS ids when present), or
        the metadata of ``path`` when it is a ``.gguf`` file."""
        path = os.fspath(path)
        if is_gguf(path):
            f = open_gguf(path)
            return cls.from_dict(*hf_config(f), path=f.path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model directory {path!r} does not exist")
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise FileNotFoundError(f"model directory {path!r} has no config.json")
        raw = _read_json(cfg_file)
        gen_file = os.path.join(path, "generation_config.json")
        gen = _read_json(gen_file) if os.path.isfile(gen_file) else {}
        return cls.from_dict(raw, gen, path=path)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None,
                  path: str | None = None) -> "ModelConfig":
        where = f" in {path}" if path else ""
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(f"unsupported architecture {archs!r}{where}; supported: {list(SUPPORTED_ARCHITECTURES)}")
        if isinstance(raw.get("text_config"), dict):  # transformers 5 nests the LM's fields
            raw = {**raw, **raw["text_config"], "architectures": archs}
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r}{where} is not supported; supported: ['silu']")

        def req(name: str) -> int:
            value = raw.get(name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ValueError(f"config field {name!r}{where} must be a positive integer, got {value!r}")
            return value

        hidden, heads = req("hidden_size"), req("num_attention_heads")
        kv_heads = raw.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}{where}")
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ValueError(f"hidden_size={hidden} is not a multiple of num_attention_heads={heads}{where} "
                                 "and config.json gives no head_dim")
            head_dim = hidden // heads
        max_pos = req("max_position_embeddings") if "max_position_embeddings" in raw else 2048
        theta, scaling = _parse_rope(raw, max_pos, where)
        vl = arch in VL_ARCHITECTURES
        mrope = _mrope_section(raw, head_dim, where) if vl else None

        is_qwen2 = arch in ("Qwen2ForCausalLM", *VL_ARCHITECTURES)
        attn_bias = bool(raw.get("attention_bias", False))
        if arch == "MistralForCausalLM":
            window = raw.get("sliding_window")
        elif arch in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", *VL_ARCHITECTURES):
            window = raw.get("sliding_window") if raw.get("use_sliding_window") else None
        else:
            window = None
        gen = generation or {}
        bos = raw.get("bos_token_id")
        if bos is None:
            bos = gen.get("bos_token_id")
        eos = _as_ids(raw.get("eos_token_id")) + _as_ids(gen.get("eos_token_id"))
        return cls(
            architecture=arch,
            model_type=raw.get("model_type", ""),
            vocab_size=req("vocab_size"),
            hidden_size=hidden,
            intermediate_size=req("intermediate_size"),
            num_hidden_layers=req("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=is_qwen2 or attn_bias,
            o_proj_bias=attn_bias and arch in ("LlamaForCausalLM", "Qwen3ForCausalLM"),
            mlp_bias=bool(raw.get("mlp_bias", False)) and arch == "LlamaForCausalLM",
            qk_norm=arch == "Qwen3ForCausalLM",
            dtype=raw.get("dtype") or raw.get("torch_dtype"),
            bos_token_id=bos,
            eos_token_ids=tuple(dict.fromkeys(eos)),
            sliding_window=window,
            mrope_section=mrope,
            vision_config=dict(raw["vision_config"]) if vl else None,
            image_token_id=raw.get("image_token_id") if vl else None,
            vision_start_token_id=raw.get("vision_start_token_id") if vl else None,
            vision_end_token_id=raw.get("vision_end_token_id") if vl else None,
            path=path,
        )


def _read_json(file: str) -> dict[str, Any]:
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object")
    return data


def _as_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def _mrope_section(raw: dict[str, Any], head_dim: int, where: str) -> tuple[int, ...]:
    """The M-RoPE sections of a Qwen2-VL config; they must add up to half the head dim."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    section = params.get("mrope_section")
    if not isinstance(raw.get("vision_config"), dict):
        raise ValueError(f"config{where} of a vision-language model has no vision_config")
    if not section or len(section) != 3 or sum(section) != head_dim // 2:
        raise ValueError(f"mrope_section={section!r}{where} must be 3 sections adding up to head_dim/2={head_dim // 2}")
    return tuple(int(s) for s in section)


def _parse_rope(raw: dict[str, Any], max_pos: int, where: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, normalised scaling dict or None) from either config format."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters{where} are not supported")
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if params.pop("mrope_section", None) is not None and rope_type == "mrope":
        rope_type = "default"  # M-RoPE is default RoPE over 3 position sections
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    partial = params.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial}{where} is not supported (only 1.0)")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}{where}; supported: {list(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":  # a top-level value wins, as in HF
        params["original_max_position_embeddings"] = raw.get(
            "original_max_position_embeddings", params.get("original_max_position_embeddings", max_pos))
    missing = [k for k in _ROPE_KEYS[rope_type] if params.get(k) is None]
    if missing:
        raise ValueError(f"rope type {rope_type!r}{where} needs {missing} in its rope parameters")
    return theta, {"rope_type": rope_type, **{k: params[k] for k in _ROPE_KEYS[rope_type]}}
