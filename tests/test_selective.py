"""BitFit and selective fine-tuning: which parameters train, the adapter semantics (copies of base parameters that
disable / delete / unload give back), mixing and merging, files, and learning on real SST-2 with the real MiniLM."""

import copy

import pytest
import torch
from conftest import assert_learns_and_reloads, tiny_bert_classifier, tiny_llama
from safetensors.torch import load_file
from torch.func import functional_call

import peftkit as pk
from peftkit.tuners.selective import BitFitConfig, SelectiveConfig, SelectiveLayer


def trainable(pm: pk.PeftModel) -> list[str]:
    return [n for n, p in pm.named_parameters() if p.requires_grad]


def perturb(pm: pk.PeftModel, adapter: str, scale: float = 0.1, seed: int = 0) -> None:
    """Give adapter ``adapter``'s copies values different from the base (a stand-in for training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if f".selected.{adapter}." in name:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def with_values(model: torch.nn.Module, values: dict[str, torch.Tensor], **inputs) -> torch.Tensor:
    """The plain model's logits with some parameters replaced: the reference for a selective adapter."""
    return functional_call(model, values, (), inputs).logits


def adapter_values(pm: pk.PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """{original parameter name: adapter value}, read from the adapter's file keys."""
    return {k.removeprefix("base_model.model."): v for k, v in pm.adapter_tensors(adapter).items()}


def bitfit_and_top_layer() -> tuple[torch.nn.Module, pk.PeftModel]:
    """A tiny BERT classifier, and a copy with two perturbed adapters: BitFit ("default") and its top layer ("top")."""
    reference = tiny_bert_classifier()
    pm = pk.get_peft_model(copy.deepcopy(reference), BitFitConfig())
    pm.add_adapter("top", SelectiveConfig(layers=[-1]))
    perturb(pm, "default", seed=1)
    perturb(pm, "top", seed=2)
    return reference, pm


IDS = torch.randint(1, 128, (3, 7), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------------------------
# Choosing parameters


def test_bitfit_trains_exactly_the_biases():
    base = tiny_bert_classifier()
    biases = {n: p.numel() for n, p in base.named_parameters() if n.endswith(".bias")}
    pm = pk.get_peft_model(copy.deepcopy(base), BitFitConfig())
    names = trainable(pm)
    assert sorted(n.replace(".selected.default.", ".").removeprefix("base_model.") for n in names) == sorted(biases)
    assert pm.get_nb_trainable_parameters()[0] == sum(biases.values()) == 1282
    # SEQ_CLS adds the classifier head (modules_to_save), trained in full and never as a BitFit copy
    pm = pk.get_peft_model(copy.deepcopy(base), BitFitConfig(task_type="SEQ_CLS"))
    head = base.classifier.weight.numel() + base.classifier.bias.numel()
    assert pm.get_nb_trainable_parameters()[0] == sum(biases.values()) - 2 + head
    assert not isinstance(pm.base_model.classifier.base_layer, SelectiveLayer)


def test_bitfit_target_modules_and_layers_filter():
    pm = pk.get_peft_model(tiny_bert_classifier(), BitFitConfig(target_modules=["query", "value"], layers_to_transform=[1]))
    assert sorted(trainable(pm)) == [
        "base_model.bert.encoder.layer.1.attention.self.query.selected.default.bias",
        "base_model.bert.encoder.layer.1.attention.self.value.selected.default.bias",
    ]
    with pytest.raises(ValueError, match=r"matched no module with a bias.*attention\.self\.query"):
        pk.get_peft_model(tiny_bert_classifier(), BitFitConfig(target_modules=["q_proj"]))


def test_bitfit_on_a_model_without_biases_says_so():
    with pytest.raises(ValueError, match=r"has none \(Llama-style.*SmolLM2.*LoRA.*\(IA\)\^3"):
        pk.get_peft_model(tiny_llama(), BitFitConfig())


def test_selective_layers_pattern_and_both():
    top = pk.get_peft_model(tiny_llama(layers=3), SelectiveConfig(layers=[-1]))
    names = trainable(top)
    assert len(names) == 9 and all(n.startswith("base_model.model.layers.2.") for n in names)
    last_layer = sum(p.numel() for n, p in tiny_llama(layers=3).named_parameters() if n.startswith("model.layers.2."))
    assert top.get_nb_trainable_parameters()[0] == last_layer
    two = pk.get_peft_model(tiny_llama(layers=3), SelectiveConfig(layers=[-2, -1]))
    assert {n.split(".")[3] for n in trainable(two)} == {"1", "2"}
    norms = pk.get_peft_model(tiny_llama(layers=3), SelectiveConfig(parameter_pattern=r"norm"))
    assert len(trainable(norms)) == 3 * 2 + 1  # two norms per layer and the final norm
    both = pk.get_peft_model(tiny_llama(layers=3), SelectiveConfig(layers=[0], parameter_pattern=r"\.mlp\."))
    assert sorted(trainable(both)) == [
        f"base_model.model.layers.0.mlp.{m}.selected.default.weight" for m in ("down_proj", "gate_proj", "up_proj")
    ]


def test_selective_errors_name_what_was_wrong():
    with pytest.raises(ValueError, match=r"matched no parameter.*model\.layers\.0\.self_attn\.q_proj\.weight"):
        pk.get_peft_model(tiny_llama(), SelectiveConfig(parameter_pattern="nothing-like-this"))
    with pytest.raises(ValueError, match=r"out of range: the model has 2 layers"):
        pk.get_peft_model(tiny_llama(), SelectiveConfig(layers=[5]))
    with pytest.raises(ValueError, match="needs layers"):
        SelectiveConfig()
    with pytest.raises(ValueError, match="not a regex"):
        SelectiveConfig(parameter_pattern="(")
    tied = tiny_llama()
    tied.config.tie_word_embeddings = True
    tied.tie_weights()
    with pytest.raises(ValueError, match="tied weights"):
        pk.get_peft_model(tied, SelectiveConfig(parameter_pattern="embed_tokens"))


# ----------------------------------------------------------------------------------------------------------------
# Semantics


def test_forward_uses_the_copies_and_the_base_never_changes():
    base = tiny_llama()
    reference = copy.deepcopy(base)
    before = {n: p.clone() for n, p in base.named_parameters()}
    pm = pk.get_peft_model(base, SelectiveConfig(layers=[-1], parameter_pattern="mlp|norm"))
    with torch.no_grad():
        assert torch.equal(pm(input_ids=IDS).logits, reference(input_ids=IDS).logits)  # copies start equal
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    pm.train()
    for _ in range(2):
        pm(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    pm.eval()
    values = adapter_values(pm, "default")
    with torch.no_grad():
        assert torch.equal(pm(input_ids=IDS).logits, with_values(reference, values, input_ids=IDS))
        assert (pm(input_ids=IDS).logits - reference(input_ids=IDS).logits).abs().max() > 1e-3
        with pm.disable_adapter():
            assert torch.equal(pm(input_ids=IDS).logits, reference(input_ids=IDS).logits)
    for name, module in pm.base_model.named_modules():
        if isinstance(module, SelectiveLayer):
            for p_name, p in module.base_layer.named_parameters(recurse=False):
                assert torch.equal(p, before[f"{name}.{p_name}"])


def test_gradients_equal_those_of_the_plain_model():
    reference = tiny_bert_classifier()
    pm = pk.get_peft_model(copy.deepcopy(reference), BitFitConfig())
    labels = torch.tensor([0, 1, 1])
    pm(input_ids=IDS, labels=labels).loss.backward()
    reference(input_ids=IDS, labels=labels).loss.backward()
    ours = {n.replace(".selected.default.", ".").removeprefix("base_model."): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert len(ours) == 19
    for name, grad in ours.items():
        assert torch.allclose(grad, dict(reference.named_parameters())[name].grad, atol=1e-7), name


def test_two_adapters_switch_add_up_and_mix_per_row():
    reference, pm = bitfit_and_top_layer()
    pm.eval()
    bias, top = adapter_values(pm, "default"), adapter_values(pm, "top")
    base_params = dict(reference.named_parameters())
    with torch.no_grad():
        pm.set_adapter("top")
        assert trainable(pm) and all(".selected.top." in n for n in trainable(pm))
        out_top = pm(input_ids=IDS).logits
        assert torch.equal(out_top, with_values(reference, top, input_ids=IDS))
        pm.set_adapter("default")
        out_bias = pm(input_ids=IDS).logits
        assert torch.equal(out_bias, with_values(reference, bias, input_ids=IDS))
        # both active: theta0 + sum of the changes where both hold a parameter
        pm.set_adapter(["default", "top"])
        combined = {**bias, **top}
        for name in set(bias) & set(top):
            combined[name] = base_params[name] + (bias[name] - base_params[name]) + (top[name] - base_params[name])
        assert (pm(input_ids=IDS).logits - with_values(reference, combined, input_ids=IDS)).abs().max() <= 1e-6
        mixed = pm(input_ids=IDS, adapter_names=["top", "__base__", "default"]).logits
        assert (mixed[0] - out_top[0]).abs().max() <= 1e-6
        assert (mixed[1] - reference(input_ids=IDS).logits[1]).abs().max() <= 1e-6
        assert (mixed[2] - out_bias[2]).abs().max() <= 1e-6
    pm.delete_adapter("top")
    with torch.no_grad():
        assert torch.equal(pm(input_ids=IDS).logits, out_bias)
    plain = pm.unload()
    assert not any(isinstance(m, SelectiveLayer) for m in plain.modules())
    with torch.no_grad():
        assert torch.equal(plain(input_ids=IDS).logits, reference(input_ids=IDS).logits)


def test_merge_unmerge_and_merge_and_unload():
    reference, pm = bitfit_and_top_layer()
    pm.set_adapter(["default", "top"])
    pm.eval()
    with torch.no_grad():
        unmerged = pm(input_ids=IDS).logits
        pm.merge_adapter()
        assert pm.merged_adapters == ["default", "top"]
        assert (pm(input_ids=IDS).logits - unmerged).abs().max() <= 1e-6
        with pm.disable_adapter():
            assert torch.equal(pm(input_ids=IDS).logits, reference(input_ids=IDS).logits)
        pm.unmerge_adapter()
        assert torch.equal(pm(input_ids=IDS).logits, unmerged)
        for name, p in reference.named_parameters():  # unmerge restored the originals exactly
            module_path, _, param = name.rpartition(".")
            module = pm.base_model.get_submodule(module_path)
            owner = module.base_layer if isinstance(module, SelectiveLayer) else module
            assert torch.equal(getattr(owner, param), p)
        plain = pm.merge_and_unload()
    assert not any(isinstance(m, SelectiveLayer) for m in plain.modules())
    with torch.no_grad():
        assert (plain(input_ids=IDS).logits - unmerged).abs().max() <= 1e-6


def test_file_holds_the_parameters_under_their_own_names_and_round_trips(tmp_path):
    reference = tiny_bert_classifier()
    pm = pk.get_peft_model(copy.deepcopy(reference), SelectiveConfig(layers=[-1], parameter_pattern="dense"))
    perturb(pm, "default")
    pm.add_adapter("bias", BitFitConfig(target_modules=["query"]))
    perturb(pm, "bias", seed=3)
    pm.save_pretrained(tmp_path)
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == sorted(
        f"base_model.model.bert.encoder.layer.1.{m}.dense.{p}"
        for m in ("attention.output", "intermediate", "output")
        for p in ("weight", "bias")
    )
    assert sorted(load_file(tmp_path / "bias" / "adapter_model.safetensors")) == [
        f"base_model.model.bert.encoder.layer.{i}.attention.self.query.bias" for i in (0, 1)
    ]
    pm.eval()
    fresh = pk.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path)
    fresh.load_adapter(tmp_path / "bias", "bias")
    assert fresh.get_nb_trainable_parameters()[0] == 0
    with torch.no_grad():
        for adapter in ("default", "bias"):
            pm.set_adapter(adapter)
            fresh.set_adapter(adapter)
            assert torch.equal(fresh(input_ids=IDS).logits, pm(input_ids=IDS).logits)
    with pytest.raises(ValueError, match="matched no parameter"):  # an adapter for another model
        pk.PeftModel.from_pretrained(tiny_llama(), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Learning: the real MiniLM on real SST-2 sentences


@pytest.mark.slow
def test_bitfit_learns_sst2_and_reloads(tmp_path, minilm):
    """All encoder and pooler biases (26,112; the head's 2 make 26,114) fitting one batch of 16 SST-2 sentences
    through the frozen head. (Over 160 sentences BitFit needs far more than 30 steps: its loss barely moves.)"""
    config = BitFitConfig(exclude_modules=["classifier"])
    assert pk.get_peft_model(copy.deepcopy(minilm[0]), config).get_nb_trainable_parameters()[0] == 26_112
    assert_learns_and_reloads(tmp_path, minilm, config, lr=1e-2, balanced=False, sentences=16)


@pytest.mark.slow
def test_selective_top_layer_learns_sst2_and_reloads(tmp_path, minilm):
    assert_learns_and_reloads(tmp_path, minilm, SelectiveConfig(layers=[-1]), lr=1e-3, balanced=False)
