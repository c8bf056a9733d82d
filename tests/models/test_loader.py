"""load_model: sharded checkpoints, dtype casting, tied heads and every error it names."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.llama import LlamaForCausalLM
from models.loader import load_model
from tests.models.paged import REF_BACKEND

pytestmark = pytest.mark.cpu

CPU = torch.device("cpu")


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(model_dir, edit):
    file = model_dir / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _load(model_dir, dtype=torch.float32):
    return load_model(str(model_dir), dtype, CPU, REF_BACKEND)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def llama_dir(hf_model_factory):
    return hf_model_factory("llama3")


def test_loads_every_parameter_from_its_hf_tensor(llama_dir):
    model = _load(llama_dir)
    hf = load_file(f"{llama_dir}/model.safetensors")
    attn = model.model.layers[1].self_attn
    q, k, v = attn.qkv_proj.weight.split([attn.q_size, attn.kv_size, attn.kv_size])
    assert torch.equal(q, hf["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(k, hf["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(v, hf["model.layers.1.self_attn.v_proj.weight"])
    gate, up = model.model.layers[0].mlp.gate_up_proj.weight.chunk(2)
    assert torch.equal(gate, hf["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(up, hf["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(model.lm_head.weight, hf["lm_head.weight"])
    assert isinstance(model, LlamaForCausalLM) and not model.training


def test_sharded_checkpoint_with_index(llama_dir, tmp_path):
    model_dir = _copy(llama_dir, tmp_path)
    tensors = load_file(model_dir / "model.safetensors")
    (model_dir / "model.safetensors").unlink()
    names = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, model_dir / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    expected = _state(_load(llama_dir))
    got = _state(_load(model_dir))
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    (model_dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        _load(model_dir)


def test_casts_on_copy_and_keeps_rope_in_float32(llama_dir):
    model = _load(llama_dir, torch.bfloat16)
    hf = load_file(f"{llama_dir}/model.safetensors")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.equal(model.model.embed_tokens.weight, hf["model.embed_tokens.weight"].to(torch.bfloat16))
    assert model.model.rotary_emb.cos_cache.dtype == torch.float32
    assert torch.get_default_dtype() == torch.float32  # restored


def test_tied_embeddings_share_one_tensor_and_ignore_a_saved_head(hf_model_factory, tmp_path):
    model_dir = _copy(hf_model_factory("llama_tied"), tmp_path)
    assert "lm_head.weight" not in load_file(model_dir / "model.safetensors")
    model = _load(model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in dict(model.named_parameters())
    _edit_tensors(model_dir, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"] * 0}))
    assert torch.equal(_load(model_dir).lm_head.weight, model.model.embed_tokens.weight)


def test_harmless_extras_are_ignored(llama_dir, tmp_path):
    model_dir = _copy(llama_dir, tmp_path)
    _edit_tensors(model_dir, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}))
    _load(model_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path / "absent")


def test_no_safetensors_names_the_directory(llama_dir, tmp_path):
    model_dir = _copy(llama_dir, tmp_path)
    (model_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=rf"no \*\.safetensors files .*{model_dir.name}"):
        _load(model_dir)


@pytest.mark.parametrize("keep", [0.999, 0.5, 1e-6])
def test_truncated_file_names_the_file(llama_dir, tmp_path, keep):
    model_dir = _copy(llama_dir, tmp_path)
    file = model_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:max(int(len(data) * keep), 5)])
    with pytest.raises(ValueError, match=rf"cannot read safetensors file '{file}' .* truncated or corrupt: "
                                         r"download or copy it again"):
        _load(model_dir)


def test_wrong_shape_names_tensor_and_shapes(llama_dir, tmp_path):
    model_dir = _copy(llama_dir, tmp_path)
    name = "model.layers.1.self_attn.k_proj.weight"
    _edit_tensors(model_dir, lambda t: t.update({name: t[name][:-1].clone()}))
    with pytest.raises(ValueError, match=rf"{name}.*expected shape \(32, 64\), found \(31, 64\)"):
        _load(model_dir)
    model_dir2 = _copy(llama_dir, tmp_path / "b")
    _edit_tensors(model_dir2, lambda t: t.update({"model.norm.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"model.norm.weight.*expected shape \(64,\), found \(3,\)"):
        _load(model_dir2)


def test_missing_tensors_are_named(llama_dir, tmp_path):
    model_dir = _copy(llama_dir, tmp_path)
    gone = ["model.layers.0.mlp.up_proj.weight", "lm_head.weight", "model.layers.1.self_attn.v_proj.weight"]
    _edit_tensors(model_dir, lambda t: [t.pop(n) for n in gone])
    with pytest.raises(ValueError, match="lacks tensors") as e:
        _load(model_dir)
    assert all(n in str(e.value) for n in gone)
    assert "k_proj" not in str(e.value) and "gate_proj" not in str(e.value)


def test_unexpected_tensors_are_named(llama_dir, tmp_path):
    model_dir = _copy(llama_dir, tmp_path)
    _edit_tensors(model_dir, lambda t: t.update({"model.layers.0.self_attn.w_proj.weight": torch.ones(2),
                                                 "model.layers.9.mlp.up_proj.weight": torch.ones(2)}))
    with pytest.raises(ValueError, match="does not use") as e:
        _load(model_dir)
    assert "model.layers.0.self_attn.w_proj.weight" in str(e.value)
    assert "model.layers.9.mlp.up_proj.weight" in str(e.value)


def test_builds_directly_on_the_target_device_without_init(llama_dir, monkeypatch):
    """Parameters come from torch.empty under the target device (meta here, no storage at all)."""
    from models import loader

    seen = {}
    monkeypatch.setattr(loader, "load_weights", lambda model, files: seen.update(model=model))
    model = load_model(str(llama_dir), torch.float16, torch.device("meta"), REF_BACKEND)
    assert model is seen["model"]
    assert all(p.device.type == "meta" and p.dtype == torch.float16 for p in model.parameters())
