"""Adapter folders: round trip, atomic writes, and clear errors for bad files."""

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from test_lora import randomize_b

import peftkit as pk
from peftkit import checkpoint

X = torch.randint(1, 120, (2, 8), generator=torch.Generator().manual_seed(0))


def saved(tmp_path, **kwargs):
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **kwargs))
    randomize_b(pm, "default")
    pm.save_pretrained(tmp_path)
    return pm


def test_round_trip_and_selected_adapters(tmp_path):
    pm = saved(tmp_path)
    pm.add_adapter("b", pk.LoraConfig(r=2, target_modules=["k_proj"]))
    pm.save_pretrained(tmp_path / "sel", selected_adapters=["b"])
    assert (tmp_path / "sel" / "b" / "adapter_config.json").exists()
    assert not (tmp_path / "sel" / "adapter_config.json").exists()
    pm.set_adapter("default")
    with torch.no_grad():
        expected = pm.eval()(input_ids=X).logits
        loaded = pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)
        assert torch.equal(loaded(input_ids=X).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())  # is_trainable=False by default
    trainable = pk.PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == pm.get_nb_trainable_parameters()[0]
    other = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=8, target_modules=["o_proj"]))
    other.load_adapter(tmp_path, "loaded")
    other.set_adapter("loaded")
    with torch.no_grad():
        assert torch.equal(other.eval()(input_ids=X).logits, expected)


def test_a_load_overwrites_every_weight_it_skipped_initialising():
    """Loads create the adapter's weights without initialising them (their values come from the file): every one
    must end up equal to the file's, for LoRA on linear and embedding layers and for bottleneck adapters, while
    adding an adapter to train still initialises (LoRA's B starts at zero)."""
    from peftkit.tuners.layer import Uninitialised

    for config in (pk.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False),
                   pk.BottleneckConfig(variant="pfeiffer", reduction_factor=4)):
        source = pk.get_peft_model(tiny_llama(), config, "x")
        with torch.no_grad():
            for p in source.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape))
        tensors = {k: v.clone() for k, v in source.adapter_tensors("x").items()}
        loaded = pk.PeftModel.from_tensors(tiny_llama(), "x", source.peft_config["x"], tensors)
        assert any(isinstance(m, Uninitialised) for m in loaded.modules())  # (the path under test was taken)
        assert set(loaded.adapter_tensors("x")) == set(tensors)
        for key, value in loaded.adapter_tensors("x").items():
            assert torch.equal(value, tensors[key]), key
    trained = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    assert not any(isinstance(m, Uninitialised) for m in trained.modules())
    assert all(float(m.lora_B["default"].weight.abs().sum()) == 0 for m in trained.modules() if hasattr(m, "lora_B"))


def test_shape_mismatch_names_file_and_key(tmp_path):
    saved(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 8
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    model = tiny_llama()
    with pytest.raises(ValueError) as err:
        pk.PeftModel.from_pretrained(model, tmp_path)
    message = str(err.value)
    assert "adapter_model.safetensors" in message and "lora_A.weight" in message and "(4, 64)" in message
    assert not any(isinstance(m, pk.tuners.AdapterLayer) for m in model.modules())  # model handed back unchanged


def test_missing_unknown_corrupted_and_pickle(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "nowhere")
    saved(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "VERA"}))
    with pytest.raises(ValueError, match="unknown peft_type 'VERA'"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    weights = tmp_path / "a" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")
    weights.unlink()
    (tmp_path / "a" / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="safetensors only"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")


def test_unexpected_and_missing_keys(tmp_path):
    saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    extra = dict(tensors, **{"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)})
    save_file(extra, path)
    with pytest.raises(ValueError, match="do not fit this model"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    save_file({k: v for k, v in tensors.items() if "layers.1" not in k}, path)
    with pytest.raises(ValueError, match="missing"):
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_atomic_write_keeps_old_file_on_crash(tmp_path):
    target = tmp_path / "adapter_model.safetensors"
    checkpoint.save_tensors(target, {"w": torch.ones(3)})

    def crash(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(target, crash)
    assert torch.equal(load_file(target)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_model.safetensors"]  # no temp file left behind
