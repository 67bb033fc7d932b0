"""(IA)^3: identity at init, HF PEFT's formula and shapes, merging, several adapters, mixed batches, files that
move both ways with HF PEFT, and learning on real SST-2 with the real MiniLM."""

import copy

import pytest
import torch
from conftest import assert_learns_and_reloads, tiny_bert_classifier, tiny_gpt2, tiny_llama
from test_lora import assert_mixed_equals_solo
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.tuners.ia3 import IA3Config, IA3Layer

X = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(0))
LLAMA = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
GPT2 = dict(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])
BERT = dict(target_modules=["key", "value", "output.dense"], feedforward_modules=["output.dense"])


def logits(model, x=X, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def randomize_ia3(pm: pk.PeftModel, adapter: str = "default", seed: int = 1) -> None:
    """Vectors around 1 with a clear spread (all-ones vectors make every comparison trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in pm.adapter_layers():
            if isinstance(layer, IA3Layer) and adapter in layer.ia3_l:
                v = layer.ia3_l[adapter]
                v.copy_(1 + 0.3 * torch.randn(v.shape, generator=g))


# ---------------------------------------------------------------------------------------------------------------
# Mechanics on tiny models


@pytest.mark.parametrize("factory,kwargs", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2), (tiny_bert_classifier, BERT)])
def test_identity_at_init(factory, kwargs):
    model = factory()
    ref = logits(model)
    pm = pk.get_peft_model(model, IA3Config(**kwargs))
    assert torch.equal(logits(pm), ref)
    for _, layer in pm.adapter_layers():
        assert torch.equal(layer.ia3_l["default"], torch.ones_like(layer.ia3_l["default"]))


def test_formula_output_and_input_scaling():
    """Attention-side targets scale the output (bias included), feed-forward ones the input (bias untouched)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 6))
    w0, b0, w1, b1 = (t.detach().clone() for t in (model[0].weight, model[0].bias, model[1].weight, model[1].bias))
    config = IA3Config(target_modules=["0", "1"], feedforward_modules=["1"], init_ia3_weights=False)
    pm = pk.get_peft_model(model, config)
    l_out, l_in = model[0].ia3_l["default"], model[1].ia3_l["default"]
    assert l_out.shape == (8, 1) and l_in.shape == (1, 8)
    x = torch.randn(5, 16)
    h = (x @ w0.T + b0) * l_out.flatten()
    expected = (h * l_in.flatten()) @ w1.T + b1
    assert torch.allclose(pm(x), expected, atol=1e-6)


def test_conv1d_scales_the_right_axis():
    """GPT-2's Conv1D stores W as in x out: merging must scale its columns for outputs, its rows for inputs."""
    model = tiny_gpt2()
    pm = pk.get_peft_model(model, IA3Config(**GPT2))
    randomize_ia3(pm)
    block = pm.base_model.transformer.h[0]
    assert block.attn.c_attn.ia3_l["default"].shape == (192, 1) and block.attn.c_attn.fan_in_fan_out
    assert block.mlp.c_proj.ia3_l["default"].shape == (1, 256) and block.mlp.c_proj.is_feedforward
    assert pm.peft_config["default"].fan_in_fan_out  # as HF PEFT records it
    ref = logits(pm)
    pm.merge_adapter()
    assert (logits(pm) - ref).abs().max().item() <= 1e-5


def test_default_targets_written_into_config(tmp_path):
    pm = pk.get_peft_model(tiny_llama(), IA3Config())
    config = pm.peft_config["default"]
    assert config.target_modules == ["k_proj", "v_proj", "down_proj"] and config.feedforward_modules == ["down_proj"]
    names = [n for n, _ in pm.adapter_layers()]
    assert len(names) == 6 and all(n.split(".")[-1] in config.target_modules for n in names)
    with pytest.raises(ValueError, match="no \\(IA\\)\\^3 default for model type 'fancy'"):
        model = tiny_llama()
        model.config.model_type = "fancy"
        pk.get_peft_model(model, IA3Config())


def test_config_and_target_errors():
    with pytest.raises(ValueError, match="subset of target_modules"):
        IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(TypeError, match=r"cannot wrap model.embed_tokens \(Embedding\): it supports linear layers \(Linear4bit, Linear8bitLt, Conv1D, Linear\)"):
        pk.get_peft_model(tiny_llama(), IA3Config(target_modules=["embed_tokens"], feedforward_modules=[]))
    pm = pk.get_peft_model(tiny_llama(), IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    with pytest.raises(ValueError, match="classifies it the other way"):
        pm.add_adapter("other", IA3Config(target_modules=["down_proj"], feedforward_modules=[]))


def test_only_vectors_train_and_counts():
    pm = pk.get_peft_model(tiny_llama(), IA3Config(**LLAMA))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("ia3_l.default") for n in trainable)
    # per layer: k_proj and v_proj outputs (2 kv heads x 16 = 32 each) + down_proj input (128); 2 layers
    assert pm.get_nb_trainable_parameters()[0] == 2 * (32 + 32 + 128)


def test_merge_unmerge_unload_exact():
    model = tiny_llama()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    pm = pk.get_peft_model(model, IA3Config(**LLAMA))
    randomize_ia3(pm)
    ref = logits(pm)
    pm.merge_adapter()
    assert pm.merged_adapters == ["default"]
    assert (logits(pm) - ref).abs().max().item() <= 1e-5
    with pm.disable_adapter():  # takes the merge out and puts it back
        assert (logits(pm) - logits(tiny_llama())).abs().max().item() <= 1e-5
    pm.unmerge_adapter()
    assert (logits(pm) - ref).abs().max().item() <= 1e-5
    restored = pm.unload().state_dict()
    for key, value in base_state.items():
        # one multiply and one divide: at most one rounding step from the original, relative
        assert torch.allclose(restored[key], value, rtol=2.5e-7, atol=0), key
    pm = pk.get_peft_model(tiny_llama(), IA3Config(**LLAMA))
    randomize_ia3(pm)
    ref = logits(pm)
    plain = pm.merge_and_unload()
    assert not any(isinstance(m, IA3Layer) for m in plain.modules())
    assert (logits(plain) - ref).abs().max().item() <= 1e-5


def test_merge_refuses_zero_entries():
    pm = pk.get_peft_model(tiny_llama(), IA3Config(**LLAMA))
    randomize_ia3(pm)
    layer = pm.base_model.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        layer.ia3_l["default"][3, 0] = 0.0
    weight = layer.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match="zero or non-finite entries"):
        layer.merge(["default"])
    assert torch.equal(layer.base_layer.weight, weight) and layer.merged_adapters == []


def test_several_active_adapters_multiply():
    pm = pk.get_peft_model(tiny_llama(), IA3Config(**LLAMA))
    pm.add_adapter("b", IA3Config(**LLAMA))
    randomize_ia3(pm, "default", seed=1)
    randomize_ia3(pm, "b", seed=2)
    pm.set_adapter(["default", "b"])
    both = logits(pm)
    single = pk.get_peft_model(tiny_llama(), IA3Config(**LLAMA))
    with torch.no_grad():
        for (name, layer), (_, other) in zip(pm.adapter_layers(), single.adapter_layers()):
            other.ia3_l["default"].copy_(layer.ia3_l["default"] * layer.ia3_l["b"])
    assert (both - logits(single)).abs().max().item() <= 1e-5
    pm.merge_adapter()  # both merged in turn
    assert (logits(pm) - both).abs().max().item() <= 1e-5


@pytest.mark.parametrize("factory,kwargs", [(tiny_llama, LLAMA), (tiny_gpt2, GPT2)])
def test_mixed_batch_rows_equal_solo_runs(factory, kwargs):
    pm = pk.get_peft_model(factory(), IA3Config(**kwargs))
    pm.add_adapter("b", IA3Config(**kwargs))
    randomize_ia3(pm, "default", seed=1)
    randomize_ia3(pm, "b", seed=2)
    pm.eval()
    assert_mixed_equals_solo(pm, ["b", "__base__", "default", "b"], X)


def test_mixed_batch_scales_each_row_by_its_own_vector():
    """Inside a layer, row i's output is exactly the base output times its adapter's vector (ones for the base)."""
    pm = pk.get_peft_model(tiny_llama(), IA3Config(**LLAMA))
    for name in ("b", "c"):
        pm.add_adapter(name, IA3Config(**LLAMA))
    for seed, name in enumerate(("default", "b", "c")):
        randomize_ia3(pm, name, seed)
    pm.eval()
    layer = pm.base_model.model.layers[1].self_attn.v_proj
    seen = {}
    layer.register_forward_hook(lambda m, args, out: seen.__setitem__("ia3", out))
    layer.base_layer.register_forward_hook(lambda m, args, out: seen.__setitem__("base", out))
    names = ["c", "__base__", "default", "b"]
    logits(pm, adapter_names=names)
    for i, name in enumerate(names):
        scale = torch.ones(32) if name == "__base__" else layer.ia3_l[name].detach().flatten()
        assert torch.equal(seen["ia3"][i], seen["base"][i] * scale), name


def test_mixed_batch_after_deleting_the_only_adapter_of_some_layers():
    pm = pk.get_peft_model(tiny_llama(), IA3Config(**LLAMA))
    pm.add_adapter("b", IA3Config(target_modules=["v_proj"], feedforward_modules=[]))
    randomize_ia3(pm, "b")
    pm.delete_adapter("default")  # k_proj and down_proj stay wrapped, with no adapter
    pm.eval()
    mixed = logits(pm, X[:2], adapter_names=["b", "__base__"])
    pm.set_adapter("b")
    assert (mixed[:1] - logits(pm, X[:1])).abs().max().item() <= 1e-5
    assert (mixed[1:] - logits(tiny_llama(), X[1:2])).abs().max().item() <= 1e-5


def test_save_load_round_trip_and_file_layout(tmp_path):
    pm = pk.get_peft_model(tiny_llama(), IA3Config(**LLAMA))
    randomize_ia3(pm)
    ref = logits(pm)
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"].shape == (32, 1)
    assert tensors["base_model.model.model.layers.1.mlp.down_proj.ia3_l"].shape == (1, 128)
    assert len(tensors) == 6
    loaded = pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert torch.equal(logits(loaded), ref)


# ---------------------------------------------------------------------------------------------------------------
# Files move both ways with Hugging Face PEFT (tiny Llama, tiny GPT-2, the real MiniLM)

def hf_peft():
    return pytest.importorskip("peft", reason="Hugging Face peft is a dev dependency: pip install -e .[dev]")


def compat_case(case, minilm):
    if case == "llama":
        return tiny_llama(), dict(LLAMA)
    if case == "gpt2":
        return tiny_gpt2(), dict(GPT2, fan_in_fan_out=True)  # HF PEFT warns when Conv1D targets lack it
    return minilm[0], dict(BERT, task_type="SEQ_CLS")


def perturb_heads(model: nn.Module) -> None:
    """Make the saved classifier copy differ from the base head, so loading it is really tested."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.05)


@pytest.mark.parametrize("case", ["llama", "gpt2", "minilm"])
def test_peftkit_file_loads_in_hf(tmp_path, case, minilm):
    peft = hf_peft()
    model, kwargs = compat_case(case, minilm)
    pm = pk.get_peft_model(copy.deepcopy(model), IA3Config(**kwargs))
    randomize_ia3(pm)
    perturb_heads(pm)
    pm.eval()
    ours = logits(pm)
    pm.save_pretrained(tmp_path)
    hf = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    assert (logits(hf) - ours).abs().max().item() <= 1e-5
    assert (ours - logits(model.eval())).abs().max().item() > 1e-2  # the adapter really changes the output
    if case == "minilm":
        ours_head = pm.base_model.classifier.modules_to_save["default"].weight
        assert torch.equal(hf.base_model.model.classifier.modules_to_save["default"].weight, ours_head)


@pytest.mark.parametrize("case", ["llama", "gpt2", "minilm"])
def test_hf_file_loads_in_peftkit(tmp_path, case, minilm):
    peft = hf_peft()
    model, kwargs = compat_case(case, minilm)
    hf = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(**kwargs))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    perturb_heads(hf)
    hf.eval()
    theirs = logits(hf)
    hf.save_pretrained(tmp_path)
    pm = pk.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert (logits(pm) - theirs).abs().max().item() <= 1e-5
    hf_keys = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items()}
    assert {k: v.shape for k, v in pm.adapter_tensors("default").items()} == hf_keys
    if case == "minilm":  # HF's suffix rule makes attention.output.dense a feed-forward (input-scaled) target too
        assert hf_keys["base_model.model.bert.encoder.layer.0.attention.output.dense.ia3_l"] == (1, 384)
        head = hf.base_model.model.classifier.modules_to_save["default"].weight
        assert torch.equal(pm.base_model.classifier.modules_to_save["default"].weight, head)


def test_parameter_counts_on_real_models(minilm, smollm2):
    """HF PEFT's default targets: one vector per key/value output and per feed-forward input (HF PEFT counts the
    same: 16,128 and 57,600)."""
    pm = pk.get_peft_model(copy.deepcopy(minilm[0]), IA3Config())
    # key, value outputs (384 each); attention.output.dense and output.dense inputs (384, 1536): 6 layers
    assert pm.get_nb_trainable_parameters()[0] == 6 * (384 + 384 + 384 + 1536) == 16_128
    pm = pk.get_peft_model(smollm2[0], IA3Config())
    try:  # k_proj, v_proj outputs (3 kv heads x 64); down_proj input (1536): 30 layers
        assert pm.get_nb_trainable_parameters()[0] == 30 * (192 + 192 + 1536) == 57_600
    finally:
        pm.unload()  # the session fixture is shared: hand it back unwrapped


# ---------------------------------------------------------------------------------------------------------------
# Learning: the real MiniLM on real SST-2 sentences


@pytest.mark.slow
def test_ia3_learns_sst2_and_reloads(tmp_path, minilm):
    assert_learns_and_reloads(tmp_path, minilm, IA3Config(**BERT), lr=5e-2, balanced=True)


def test_add_weighted_adapter_combines_ia3_vectors_linearly(tmp_path):
    """HF PEFT's (IA)^3 rule: l_new = sum_i w_i l_i per layer; the combined adapter saves and reloads."""
    base = tiny_llama()
    targets = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)
    pm = pk.get_peft_model(copy.deepcopy(base), IA3Config(**targets), adapter_name="a")
    pm.add_adapter("b", IA3Config(**targets))
    pm.add_weighted_adapter(["a", "b"], [0.6, 0.4], "mix", combination_type="linear")
    layers = [layer for _, layer in pm.adapter_layers()]
    assert len(layers) == 6
    for layer in layers:
        expected = 0.6 * layer.ia3_l["a"] + 0.4 * layer.ia3_l["b"]
        assert torch.allclose(layer.ia3_l["mix"], expected, atol=0, rtol=0)
    pm.set_adapter("mix")
    pm.eval()
    x = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        mixed = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path, selected_adapters=["mix"])  # adapters other than "default" go in a subfolder
    loaded = pk.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "mix").eval()
    with torch.no_grad():
        assert (loaded(input_ids=x).logits - mixed).abs().max().item() <= 1e-6
    with pytest.raises(ValueError, match="combine linearly: pass combination_type='linear', not 'svd'"):
        pm.add_weighted_adapter(["a", "b"], [0.5, 0.5], "svd-mix", combination_type="svd")
    pm.add_adapter("lora", pk.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="combines adapters of one method"):
        pm.add_weighted_adapter(["a", "lora"], [0.5, 0.5], "bad", combination_type="linear")
