"""Bottleneck adapters: identity at init, placement per architecture, exact parameter counts on the real models,
the formula, no merging, several adapters, mixed batches, files, and learning on real SST-2 with the real MiniLM."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_learns_and_reloads, tiny_bert_classifier, tiny_gpt2, tiny_llama
from test_lora import assert_mixed_equals_solo
from safetensors.torch import load_file
from torch import nn

import peftkit as pk
from peftkit.tuners.bottleneck import BottleneckConfig, BottleneckLayer

X = torch.randint(0, 128, (4, 10), generator=torch.Generator().manual_seed(0))


def logits(model, x=X, **kw):
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


def randomize_up(pm: pk.PeftModel, adapter: str = "default", seed: int = 1) -> None:
    """Give the up-projections non-zero weights and biases (they start at zero, making every output trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in pm.adapter_layers():
            if isinstance(layer, BottleneckLayer) and adapter in layer.adapter_up:
                for p in layer.adapter_up[adapter].parameters():
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))


def adapted(pm: pk.PeftModel) -> list[str]:
    return [name for name, layer in pm.adapter_layers() if isinstance(layer, BottleneckLayer)]


# ---------------------------------------------------------------------------------------------------------------
# Placement and counts


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2, tiny_bert_classifier])
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer"])
def test_identity_at_init(factory, variant):
    model = factory()
    ref = logits(model)
    pm = pk.get_peft_model(model, BottleneckConfig(variant=variant, reduction_factor=8))
    assert torch.equal(logits(pm), ref)
    for _, layer in pm.adapter_layers():
        assert not layer.adapter_up["default"].weight.any() and not layer.adapter_up["default"].bias.any()


def test_placement_per_architecture():
    bert = pk.get_peft_model(tiny_bert_classifier(), BottleneckConfig(variant="houlsby", reduction_factor=8))
    assert adapted(bert) == [
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense",
    ]
    # Pfeiffer: `layer.N.output.dense` only, not the attention output whose path also ends in `output.dense`
    bert = pk.get_peft_model(tiny_bert_classifier(), BottleneckConfig(variant="pfeiffer", reduction_factor=8))
    assert adapted(bert) == ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.output.dense"]
    llama = pk.get_peft_model(tiny_llama(), BottleneckConfig(variant="houlsby", reduction_factor=8))
    assert adapted(llama) == [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj")]
    gpt2 = pk.get_peft_model(tiny_gpt2(), BottleneckConfig(variant="pfeiffer", reduction_factor=8))
    assert adapted(gpt2) == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]
    explicit = pk.get_peft_model(tiny_llama(), BottleneckConfig(target_modules=["up_proj"], bottleneck_size=4))
    assert adapted(explicit) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    down = explicit.base_model.model.layers[0].mlp.up_proj.adapter_down["default"]
    assert down.weight.shape == (4, 128)  # d = up_proj's outputs
    only_last = pk.get_peft_model(tiny_llama(), BottleneckConfig(reduction_factor=8, layers_to_transform=[1]))
    assert adapted(only_last) == ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"]


def test_config_and_placement_errors():
    with pytest.raises(ValueError, match="variant must be one of"):
        BottleneckConfig(variant="parallel")
    with pytest.raises(ValueError, match="non_linearity must be one of"):
        BottleneckConfig(non_linearity="tanh")
    with pytest.raises(ValueError, match="leaves no bottleneck"):
        pk.get_peft_model(tiny_llama(), BottleneckConfig(reduction_factor=128))
    model = tiny_llama()
    model.config.model_type = "fancy"
    with pytest.raises(ValueError, match="no bottleneck-adapter placement for model type 'fancy'"):
        pk.get_peft_model(model, BottleneckConfig())
    with pytest.raises(TypeError, match="cannot wrap model.embed_tokens"):
        pk.get_peft_model(tiny_llama(), BottleneckConfig(target_modules=["embed_tokens"]))


def expected_count(d: int, m: int, placements: int) -> int:
    return placements * (2 * m * d + d + m)


@pytest.mark.parametrize("variant,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_parameter_count_minilm(minilm, variant, per_layer):
    pm = pk.get_peft_model(copy.deepcopy(minilm[0]), BottleneckConfig(variant=variant))  # reduction 16: m = 24
    assert pm.get_nb_trainable_parameters()[0] == expected_count(384, 24, 6 * per_layer)
    assert expected_count(384, 24, 1) == 18_840
    for _, layer in pm.adapter_layers():
        assert sum(p.numel() for p in layer.adapter_parameters("default")) == 18_840


@pytest.mark.parametrize("variant,per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_parameter_count_smollm2(smollm2, variant, per_layer):
    model = smollm2[0]
    pm = pk.get_peft_model(model, BottleneckConfig(variant=variant))  # d = 576, m = 36
    try:
        assert pm.get_nb_trainable_parameters()[0] == expected_count(576, 36, 30 * per_layer)
        assert len(adapted(pm)) == 30 * per_layer
    finally:
        pm.unload()  # the session fixture is shared: hand it back unwrapped


# ---------------------------------------------------------------------------------------------------------------
# Mechanics


@pytest.mark.parametrize("non_linearity,f", [("relu", F.relu), ("gelu", F.gelu), ("swish", F.silu)])
def test_formula(non_linearity, f):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32))
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    config = BottleneckConfig(target_modules=["0"], bottleneck_size=4, non_linearity=non_linearity, init_scale=0.1)
    pm = pk.get_peft_model(model, config)
    randomize_up(pm)
    down, up = model[0].adapter_down["default"], model[0].adapter_up["default"]
    assert down.weight.abs().max().item() <= 0.2  # truncated at two std
    x = torch.randn(5, 16)
    h = x @ w.T + b
    expected = h + f(h @ down.weight.T + down.bias) @ up.weight.T + up.bias
    assert torch.allclose(pm(x), expected, atol=1e-6)


def test_only_adapters_train_and_dropout_only_in_training():
    pm = pk.get_peft_model(tiny_llama(), BottleneckConfig(reduction_factor=8, dropout=0.5))
    randomize_up(pm)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter_down.default." in n or ".adapter_up.default." in n for n in trainable)
    pm.eval()
    assert torch.equal(logits(pm), logits(pm))
    pm.train()
    torch.manual_seed(0)
    assert not torch.equal(logits(pm), logits(pm))


def test_wraps_a_4bit_quantized_projection():
    """The adapter only reads the wrapped layer's output, so a bitsandbytes NF4 base layer works unchanged."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    quantized = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type="nf4")
    quantized.load_state_dict(dense.state_dict())
    model = nn.Sequential(quantized.to("cpu"))  # moving to a device is what quantizes the weight
    x = torch.randn(3, 64)
    ref = model(x).detach()
    pm = pk.get_peft_model(model, BottleneckConfig(target_modules=["0"], bottleneck_size=4))
    assert torch.equal(pm(x), ref)
    randomize_up(pm)
    up, down = model[0].adapter_up["default"], model[0].adapter_down["default"]
    with torch.no_grad():
        assert torch.allclose(pm(x), ref + up(F.relu(down(ref))), atol=1e-6)


def test_merge_is_refused_and_changes_nothing():
    pm = pk.get_peft_model(tiny_llama(), BottleneckConfig(reduction_factor=8))
    randomize_up(pm)
    ref = logits(pm)
    with pytest.raises(TypeError, match="BOTTLENECK.*cannot be merged"):
        pm.merge_adapter()
    with pytest.raises(TypeError, match="cannot be merged"):
        pm.merge_and_unload()
    with pytest.raises(TypeError, match="cannot be merged into its weights"):
        pm.base_model.model.layers[0].mlp.down_proj.merge(["default"])
    assert pm.merged_adapters == [] and torch.equal(logits(pm), ref)


def test_several_active_adapters_add_up():
    model = nn.Sequential(nn.Linear(8, 16))
    pm = pk.get_peft_model(model, BottleneckConfig(target_modules=["0"], bottleneck_size=4, init_scale=0.1))
    pm.add_adapter("b", BottleneckConfig(target_modules=["0"], bottleneck_size=2, non_linearity="gelu", init_scale=0.1))
    randomize_up(pm, "default", 1)
    randomize_up(pm, "b", 2)
    x = torch.randn(3, 8)
    layer = model[0]
    h = layer.base_layer(x)

    def delta(name, f):
        return layer.adapter_up[name](f(layer.adapter_down[name](h)))

    pm.set_adapter(["default", "b"])
    with torch.no_grad():
        assert torch.allclose(pm(x), h + delta("default", F.relu) + delta("b", F.gelu), atol=1e-6)
    with pm.disable_adapter():
        assert torch.equal(pm(x), h)
    pm.delete_adapter("b")
    with torch.no_grad():
        assert torch.allclose(pm(x), h + delta("default", F.relu), atol=1e-6)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_mixed_batch_rows_equal_solo_runs(factory):
    """Adapters of different widths and non-linearities in one batch (zero padding, per-row activation)."""
    pm = pk.get_peft_model(factory(), BottleneckConfig(reduction_factor=8, init_scale=0.1))
    pm.add_adapter("narrow", BottleneckConfig(bottleneck_size=3, non_linearity="gelu", init_scale=0.1))
    ffn = BottleneckConfig(variant="pfeiffer", bottleneck_size=5, non_linearity="swish", init_scale=0.1)
    pm.add_adapter("ffn", ffn)
    for seed, name in enumerate(("default", "narrow", "ffn")):
        randomize_up(pm, name, seed)
    pm.eval()
    x = torch.randint(0, 128, (5, 10), generator=torch.Generator().manual_seed(1))
    assert_mixed_equals_solo(pm, ["narrow", "__base__", "default", "ffn", "narrow"], x)


def test_mixed_batch_after_deleting_the_only_adapter_of_some_layers():
    """Houlsby 'a' and Pfeiffer 'b': deleting 'a' leaves the attention projections wrapped with no adapter."""
    pm = pk.get_peft_model(tiny_llama(), BottleneckConfig(variant="houlsby", reduction_factor=8))
    pm.add_adapter("b", BottleneckConfig(variant="pfeiffer", reduction_factor=8))
    randomize_up(pm, "b")
    pm.delete_adapter("default")
    pm.eval()
    assert pm.base_model.model.layers[0].self_attn.o_proj.adapter_names == []
    mixed = logits(pm, X[:2], adapter_names=["b", "__base__"])
    pm.set_adapter("b")
    assert (mixed[:1] - logits(pm, X[:1])).abs().max().item() <= 1e-5
    assert (mixed[1:] - logits(tiny_llama(), X[1:2])).abs().max().item() <= 1e-5


def test_save_load_round_trip_and_file_layout(tmp_path):
    config = BottleneckConfig(variant="houlsby", reduction_factor=8, non_linearity="gelu", init_scale=0.1)
    pm = pk.get_peft_model(tiny_gpt2(), config)
    randomize_up(pm)
    pm.add_adapter("second", BottleneckConfig(variant="pfeiffer", bottleneck_size=2))
    randomize_up(pm, "second", 5)
    ref = logits(pm)
    pm.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    prefix = "base_model.model.transformer.h.0.attn.c_proj"
    assert tensors[f"{prefix}.adapter_down.weight"].shape == (8, 64)
    assert tensors[f"{prefix}.adapter_down.bias"].shape == (8,)
    assert tensors[f"{prefix}.adapter_up.weight"].shape == (64, 8)
    assert tensors[f"{prefix}.adapter_up.bias"].shape == (64,)
    assert len(tensors) == 4 * 4
    assert len(load_file(tmp_path / "second" / "adapter_model.safetensors")) == 2 * 4
    saved = (tmp_path / "adapter_config.json").read_text()
    assert '"peft_type": "BOTTLENECK"' in saved and '"non_linearity": "gelu"' in saved
    loaded = pk.PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert loaded.peft_config["default"].non_linearity == "gelu"
    assert torch.equal(logits(loaded), ref)
    loaded.load_adapter(tmp_path / "second", "second")
    loaded.set_adapter("second")
    pm.set_adapter("second")
    assert torch.equal(logits(loaded), logits(pm))


# ---------------------------------------------------------------------------------------------------------------
# Learning: the real MiniLM on real SST-2 sentences


@pytest.mark.slow
@pytest.mark.parametrize("variant,lr", [("houlsby", 3e-3), ("pfeiffer", 1e-2)])
def test_learns_sst2_and_reloads(tmp_path, minilm, variant, lr):
    assert_learns_and_reloads(tmp_path, minilm, BottleneckConfig(variant=variant), lr=lr, balanced=True)


def test_mixed_batch_after_deleting_an_adapter_equals_solo():
    """Deleting an adapter frees its slot in the mixed-batch stacks; the next mixed batch still equals solo runs
    (the slot update must rebuild bottleneck stacks, which carry their non-linearities)."""
    pm = pk.get_peft_model(tiny_llama(), pk.BottleneckConfig(variant="houlsby", reduction_factor=4), "a")
    pm.add_adapter("b", pk.BottleneckConfig(variant="pfeiffer", reduction_factor=4))
    pm.add_adapter("c", pk.BottleneckConfig(variant="houlsby", reduction_factor=8))
    pm.eval()
    x = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pm(input_ids=x, adapter_names=["a", "c"])
        pm.delete_adapter("b")
        mixed = pm(input_ids=x, adapter_names=["a", "c"]).logits
        for row, name in enumerate(["a", "c"]):
            pm.set_adapter(name)
            assert (mixed[row] - pm(input_ids=x[row : row + 1]).logits[0]).abs().max().item() < 1e-5, name
