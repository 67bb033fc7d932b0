"""Bad configs and API calls: values that silently did nothing are refused, nesting is refused, a failed wrap rolls
back, and a tied output head is warned about and merged without touching the input embeddings."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import tiny_llama
from test_lora import randomize_b

import peftkit as pk
from peftkit.tuners.base import config_from_dict
from peftkit.tuners.bottleneck import BottleneckConfig
from peftkit.tuners.prefix import PrefixTuningConfig
from peftkit.tuners.prompt import PromptTuningConfig
from peftkit.tuners.selective import SelectiveConfig

X = torch.randint(1, 120, (2, 8), generator=torch.Generator().manual_seed(0))
NAN, INF = math.nan, math.inf


@pytest.mark.parametrize("make, message", [
    (lambda: pk.LoraConfig(r=0), "LoraConfig.r must be a positive integer, got 0"),
    (lambda: pk.LoraConfig(r=-4), "LoraConfig.r must be a positive integer, got -4"),
    (lambda: pk.LoraConfig(r=2.5), "LoraConfig.r must be a positive integer, got 2.5"),
    (lambda: pk.LoraConfig(r=True), "LoraConfig.r must be a positive integer, got True"),
    (lambda: pk.LoraConfig(lora_alpha=0), r"LoraConfig.lora_alpha must be a finite number > 0 \(the update is scaled by "
                                          r"lora_alpha / r: 0 makes it, and every LoRA gradient, zero\), got 0"),
    (lambda: pk.LoraConfig(lora_alpha=-16), "lora_alpha must be a finite number > 0 .*got -16"),
    (lambda: pk.LoraConfig(lora_alpha=NAN), "lora_alpha must be a finite number > 0 .*got nan"),
    (lambda: pk.LoraConfig(lora_alpha=INF), "lora_alpha must be a finite number > 0 .*got inf"),
    (lambda: pk.LoraConfig(lora_alpha="16"), "lora_alpha must be a finite number > 0 .*got '16'"),
    (lambda: pk.LoraConfig(lora_dropout=1.0), r"LoraConfig.lora_dropout must be a number in \[0, 1\), got 1.0"),
    (lambda: pk.LoraConfig(lora_dropout=-0.1), r"lora_dropout must be a number in \[0, 1\), got -0.1"),
    (lambda: pk.LoraConfig(lora_dropout=NAN), r"lora_dropout must be a number in \[0, 1\), got nan"),
    (lambda: pk.LoraConfig(lora_dropout="0.1"), r"lora_dropout must be a number in \[0, 1\), got '0.1'"),
    (lambda: pk.LoraConfig(rank_pattern={"q_proj": 0}), r"LoraConfig.rank_pattern\['q_proj'\] must be a positive integer"),
    (lambda: pk.LoraConfig(alpha_pattern={"q_proj": -1}), r"LoraConfig.alpha_pattern\['q_proj'\] must be a finite number > 0"),
    (lambda: pk.LoraConfig(rank_pattern=[4]), "LoraConfig.rank_pattern must be a dict of module name -> r"),
    (lambda: pk.LoraConfig(layers_to_transform=[-1]), r"LoraConfig.layers_to_transform must be layer indices >= 0, got \[-1\]"),
    (lambda: pk.LoraConfig(layers_to_transform=["0"]), "layers_to_transform must be layer indices >= 0"),
    (lambda: pk.LoraConfig(target_modules=5), "LoraConfig.target_modules must be a list of module names or a regex"),
    (lambda: pk.IA3Config(target_modules=["k_proj", 3]), "IA3Config.target_modules must be a list of module names"),
    (lambda: BottleneckConfig(reduction_factor=0), r"BottleneckConfig.reduction_factor must be a finite number > 0 \(the "
                                                   "bottleneck is d / reduction_factor\\), got 0"),
    (lambda: BottleneckConfig(reduction_factor=-2), "reduction_factor must be a finite number > 0 .*got -2"),
    (lambda: BottleneckConfig(reduction_factor=NAN), "reduction_factor must be a finite number > 0 .*got nan"),
    (lambda: BottleneckConfig(bottleneck_size=0), "BottleneckConfig.bottleneck_size must be a positive integer, got 0"),
    (lambda: BottleneckConfig(dropout=1), r"BottleneckConfig.dropout must be a number in \[0, 1\), got 1"),
    (lambda: BottleneckConfig(init_scale=NAN), "BottleneckConfig.init_scale must be a finite number >= 0, got nan"),
    (lambda: PromptTuningConfig(num_virtual_tokens=0), "PromptTuningConfig.num_virtual_tokens must be a positive integer, got 0"),
    (lambda: PromptTuningConfig(num_virtual_tokens=-3), "num_virtual_tokens must be a positive integer, got -3"),
    (lambda: PromptTuningConfig(num_virtual_tokens=True), "num_virtual_tokens must be a positive integer, got True"),
    (lambda: PromptTuningConfig(num_virtual_tokens=4, token_dim=0), "PromptTuningConfig.token_dim must be a positive integer"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=4, num_layers=-1), "PrefixTuningConfig.num_layers must be a positive integer"),
    (lambda: PrefixTuningConfig(num_virtual_tokens=4, encoder_hidden_size=0), "encoder_hidden_size must be a positive integer"),
    (lambda: SelectiveConfig(layers=["top"]), r"SelectiveConfig.layers must be layer indices \(negative counts from the top\)"),
    (lambda: config_from_dict({"peft_type": "LORA", "lora_alpha": 0}), "LoraConfig.lora_alpha must be a finite number > 0"),
    (lambda: config_from_dict({"peft_type": "LORA", "r": "8"}), "LoraConfig.r must be a positive integer, got '8'"),
])
def test_silently_useless_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_valid_edge_values_are_accepted():
    assert pk.LoraConfig(lora_alpha=0.5, lora_dropout=0.0, r=1).lora_alpha == 0.5
    assert BottleneckConfig(reduction_factor=0.5, init_scale=0).reduction_factor == 0.5
    assert SelectiveConfig(layers=-1).layers == [-1]


# ----------------------------------------------------------------------------------------------------------------
# Nesting and rollback


def test_get_peft_model_on_a_peft_model_is_refused():
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    advice = "Add another adapter with model.add_adapter\\(name, config\\) or load one with model.load_adapter"
    with pytest.raises(ValueError, match=rf"this model already holds adapters \(\['default'\]\).*{advice}"):
        pk.get_peft_model(pm, pk.LoraConfig(r=4, target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=rf"already holds adapters \(its injected adapter layers\).*{advice}"):
        pk.get_peft_model(pm.base_model, pk.LoraConfig(r=4, target_modules=["v_proj"]))
    assert list(pm.peft_config) == ["default"]


@pytest.mark.parametrize("name", ["train", "training", "to", "keys", "forward", "a.b", ""])
def test_adapter_names_pytorch_or_files_cannot_take_are_refused_in_one_line(name):
    """A name that is a method of PyTorch's module containers would fail deep inside nn.ModuleDict (KeyError
    "attribute 'train' already exists"); it is refused up front, saying why, and the model is unchanged."""
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=f"adapter name {name!r} must be non-empty letters.*not a name PyTorch modules use"):
        pm.add_adapter(name, pk.LoraConfig(r=4, target_modules=["v_proj"]))
    assert list(pm.peft_config) == ["default"]
    pm.add_adapter("train2", pk.LoraConfig(r=4, target_modules=["v_proj"]))  # (only the exact names are taken)


def test_from_pretrained_on_a_peft_model_is_refused(tmp_path):
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="this model already holds adapters"):
        pk.PeftModel.from_pretrained(pm, tmp_path)


def _state(model):
    return ([(n, type(m).__name__) for n, m in model.named_modules()],
            [(n, p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()])


def _same(a, b) -> bool:
    return a[0] == b[0] and all(x[:2] == y[:2] and torch.equal(x[2], y[2]) for x, y in zip(a[1], b[1]))


BAD_TARGETS = ["q_proj", "v_proj", "input_layernorm"]  # layer 0's projections are wrapped before the norm fails


def test_get_peft_model_that_fails_midway_leaves_the_model_as_it_was():
    model = tiny_llama()
    before = _state(model)
    with pytest.raises(TypeError, match="LoRA cannot wrap model.layers.0.input_layernorm"):
        pk.get_peft_model(model, pk.LoraConfig(r=4, target_modules=BAD_TARGETS))
    assert _same(_state(model), before)
    assert all(p.requires_grad for p in model.parameters())  # not left frozen either


def test_add_adapter_that_fails_midway_leaves_the_peft_model_as_it_was():
    pm = pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj"]))
    before, active = _state(pm), pm.active_adapters
    with pytest.raises(TypeError, match="LoRA cannot wrap model.layers.0.input_layernorm"):
        pm.add_adapter("second", pk.LoraConfig(r=4, target_modules=BAD_TARGETS))
    assert _same(_state(pm), before) and list(pm.peft_config) == ["default"] and pm.active_adapters == active
    pm.add_adapter("second", pk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # the name is free again
    assert list(pm.peft_config) == ["default", "second"]


# ----------------------------------------------------------------------------------------------------------------
# A tied output head


def tied_llama():
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    return model


@pytest.mark.parametrize("config", [
    pk.LoraConfig(r=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
    pk.IA3Config(target_modules=["lm_head", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False),
])
def test_adapter_on_a_tied_head_warns_and_merging_leaves_the_embeddings(config):
    model = tied_llama()
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with pytest.warns(UserWarning, match=r"targets lm_head, whose weight is tied to \(shared with\) "
                                         r"model.embed_tokens.weight \(tie_word_embeddings=True\)"):
        pm = pk.get_peft_model(model, config)
    pm.eval()
    adapted = pm(input_ids=X).logits.detach()
    pm.merge_adapter()
    assert torch.equal(pm.base_model.model.embed_tokens.weight, embeddings)
    pm.unmerge_adapter()
    merged = pm.merge_and_unload()
    with torch.no_grad():
        assert (merged(input_ids=X).logits - adapted).abs().max().item() < 1e-5
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)
    assert merged.lm_head.weight is not merged.model.embed_tokens.weight
    assert merged.config.tie_word_embeddings is False  # transformers must not tie them again on save or load


def test_untied_targets_give_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.get_peft_model(tiny_llama(), pk.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))


@pytest.mark.slow
def test_real_smollm2_tied_head_merges_to_the_adapters_logits(smollm2, tmp_path):
    model, tok = smollm2
    model = copy.deepcopy(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    embeddings = model.model.embed_tokens.weight.detach().clone()
    with pytest.warns(UserWarning, match="targets lm_head, whose weight is tied"):
        pm = pk.get_peft_model(model, pk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "lm_head"]))
    randomize_b(pm, "default")
    ids = tok(["The capital of France is", "LoRA adds a low-rank update"], padding=True, return_tensors="pt")
    with torch.no_grad():
        adapted = pm.eval()(**ids).logits
        with pm.disable_adapter():
            plain = pm(**ids).logits
        merged = pm.merge_and_unload()
        after = merged(**ids).logits
    assert (adapted - plain).abs().max().item() > 0.1  # the adapter does change the logits
    assert (after - adapted).abs().max().item() < 1e-4
    assert torch.equal(merged.model.embed_tokens.weight, embeddings)
    merged.save_pretrained(tmp_path)  # what `peftkit merge` does: reloaded, the head stays the merged one
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert (reloaded(**ids).logits - adapted).abs().max().item() < 1e-4
    assert torch.equal(reloaded.model.embed_tokens.weight, embeddings)
