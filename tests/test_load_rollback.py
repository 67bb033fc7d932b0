"""A load that fails part-way leaves the model exactly as it was, through every way of loading an adapter.

Each broken folder fails at a different stage: while wrapping modules (a target LoRA cannot wrap, after others are
wrapped already), or after injection when the file is checked (a wrong shape, a missing key).
"""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from test_lora import randomize_b

import peftkit as pk
from peftkit.serve.registry import AdapterRegistry, read_adapter

X = torch.randint(1, 120, (2, 8), generator=torch.Generator().manual_seed(0))


def break_folder(folder, how: str) -> str:
    """Damage a saved adapter folder in place; returns the start of the error it must raise."""
    config = json.loads((folder / "adapter_config.json").read_text())
    if how == "inject":  # input_layernorm is matched after the q_proj and v_proj of layer 0 are wrapped
        config["target_modules"] = ["q_proj", "v_proj", "input_layernorm"]
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return "LoRA cannot wrap"
    if how == "shape":
        config["r"] = 8
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return "key .* has shape"
    weights = folder / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "layers.1.self_attn.v_proj" not in k}, weights)
    return "key\\(s\\) missing"


@pytest.fixture(params=["inject", "shape", "missing"])
def broken(request, tmp_path):
    """A LoRA folder on q_proj and v_proj, broken one way; (folder, expected error)."""
    pm = pk.get_peft_model(tiny_llama(seed=1), pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_b(pm, "default")
    pm.save_pretrained(tmp_path)
    return tmp_path, break_folder(tmp_path, request.param)


def state(model: torch.nn.Module) -> dict:
    """Everything a failed load must not change: module tree, parameters (values and requires_grad), outputs."""
    peft = model if isinstance(model, pk.PeftModel) else None
    with torch.no_grad():
        logits = model(input_ids=X).logits
    return {
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "params": [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, b.clone()) for n, b in model.named_buffers()],
        "adapters": (list(peft.peft_config), peft.active_adapters) if peft else None,
        "logits": logits,
    }


def assert_same(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"] and after["adapters"] == before["adapters"]
    for (n0, v0, g0), (n1, v1, g1) in zip(before["params"], after["params"], strict=True):
        assert (n1, g1) == (n0, g0) and torch.equal(v1, v0), n0
    for (n0, b0), (n1, b1) in zip(before["buffers"], after["buffers"], strict=True):
        assert n1 == n0 and torch.equal(b1, b0), n0
    assert torch.equal(after["logits"], before["logits"])


def trained_model() -> pk.PeftModel:
    """A model with a trainable adapter that shares q_proj with the broken one (v_proj is new to it)."""
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=2, target_modules=["q_proj", "o_proj"]), "mine")
    randomize_b(pm, "mine")
    return pm


def test_from_pretrained_hands_the_model_back_unchanged(broken):
    folder, error = broken
    model = tiny_llama()  # every parameter trainable, as a freshly loaded model is
    before = state(model)
    with pytest.raises((ValueError, TypeError), match=error):
        pk.PeftModel.from_pretrained(model, folder)
    assert_same(before, state(model))


def test_load_adapter_leaves_the_peft_model_unchanged(broken):
    folder, error = broken
    pm = trained_model()
    before = state(pm)
    with pytest.raises((ValueError, TypeError), match=error):
        pm.load_adapter(folder, "new")
    assert_same(before, state(pm))
    pm.add_adapter("new", pk.LoraConfig(r=4, target_modules=["v_proj"]))  # the name is free again


@pytest.mark.parametrize("first", [True, False], ids=["first-adapter", "next-adapter"])
def test_server_registry_leaves_the_served_model_unchanged(broken, first, tmp_path):
    folder, error = broken
    registry = AdapterRegistry(tiny_llama(), SimpleNamespace(eos_token_id=None, pad_token_id=None), "tiny")
    if not first:
        good = tmp_path / "good"
        trained_model().save_pretrained(good)
        good = good / "mine"  # HF layout: a non-default adapter is saved in a subfolder named after it
        registry.attach("good", *read_adapter(good), str(good))
    served = registry.model if first else registry.peft
    before = state(served)
    with pytest.raises((ValueError, TypeError), match=error):
        registry.attach("new", *read_adapter(folder), str(folder))
    assert (registry.peft is None) == first and [a.name for a in registry.models()] == ([] if first else ["good"])
    assert_same(before, state(served))
